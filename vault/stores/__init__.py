"""Secret stores: MongoDB for production, an embedded SQLite file by default."""
