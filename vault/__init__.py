"""secret-manager: stores secrets encrypted and hands them back by id."""

__version__ = "0.1.0"
