"""Who may see a secret, as both stores judge it in the call that reads it: tenants,
readers, the owner's delete, and records edited in the database after they were sealed."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import RawRecords, on_store
from vault.crypto import Keyring
from vault.errors import DecryptionFailed
from vault.lifecycle import Caller, Denied, Found
from vault.records import SealedSecret, record_key
from vault.stores.base import DeleteResult, SecretStore

KEYRING = Keyring(b"k" * 32)
OWNER = Caller("acme", "ci")
READER = Caller("acme", "billing")
NEIGHBOUR = Caller("acme", "web")  # same tenant, not a reader
STRANGER = Caller("beta", "billing")  # same name, another tenant


def seal(secret_id: str, *, reads: int | None = None, **access: Any) -> SealedSecret:
    sealed = KEYRING.seal(record_key(secret_id), b"payload " + secret_id.encode(), **access)
    if reads is None:
        return sealed
    return SealedSecret(**{**sealed.__dict__, "reads_left": reads})


def store_one(env: dict[str, str], record: SealedSecret) -> None:
    async def work(store: SecretStore) -> None:
        await store.insert(record)

    on_store(env, work)


def fetch_as(env: dict[str, str], secret_id: str, caller: Caller) -> Any:
    async def work(store: SecretStore) -> Any:
        fetched, _ = await store.fetch(secret_id, KEYRING, None, caller)
        return fetched

    return on_store(env, work)


def delete_as(env: dict[str, str], secret_id: str, caller: Caller) -> DeleteResult:
    async def work(store: SecretStore) -> DeleteResult:
        return await store.delete(secret_id, caller)

    result: DeleteResult = on_store(env, work)
    return result


@pytest.fixture
def shared(store_env: dict[str, str]) -> tuple[dict[str, str], str]:
    """A secret of tenant acme made by key ci for reader billing, with 2 reads."""
    secret_id = str(uuid.uuid4())
    store_one(store_env, seal(secret_id, reads=2, tenant="acme", owner="ci", readers=("billing",)))
    return store_env, secret_id


def test_only_a_reader_fetches_and_a_refusal_spends_no_read(
    shared: tuple[dict[str, str], str], raw_records: RawRecords
) -> None:
    env, secret_id = shared
    for caller, reason in (
        (OWNER, Denied.READERS),
        (NEIGHBOUR, Denied.READERS),
        (STRANGER, Denied.TENANT),
        (Caller(), Denied.TENANT),
        (Caller("acme", None), Denied.READERS),
    ):
        fetched = fetch_as(env, secret_id, caller)
        assert (fetched.found, fetched.denied) == (Found.DENIED, reason), caller
        assert fetched.plaintext is None and fetched.record is None
    stored = raw_records.sealed(secret_id)
    assert stored is not None and stored.reads_left == 2  # no refusal took a read
    fetched = fetch_as(env, secret_id, READER)
    assert fetched.found is Found.SECRET
    assert fetched.plaintext == b"payload " + secret_id.encode()
    assert fetched.record.readers == ("billing",) and fetched.record.tenant == "acme"
    assert fetched.record.reads_left == 1


def test_the_owner_and_a_reader_delete_nobody_else(
    shared: tuple[dict[str, str], str], store_env: dict[str, str]
) -> None:
    env, secret_id = shared
    assert delete_as(env, secret_id, STRANGER) is DeleteResult.DENIED_TENANT
    assert delete_as(env, secret_id, NEIGHBOUR) is DeleteResult.DENIED_READERS
    assert delete_as(env, secret_id, Caller()) is DeleteResult.DENIED_TENANT
    assert fetch_as(env, secret_id, READER).found is Found.SECRET  # still there
    assert delete_as(env, secret_id, OWNER) is DeleteResult.DELETED
    assert delete_as(env, secret_id, OWNER) is DeleteResult.MISSING
    other = str(uuid.uuid4())
    store_one(store_env, seal(other, tenant="acme", owner="ci", readers=("billing",)))
    assert delete_as(store_env, other, READER) is DeleteResult.DELETED


def test_a_secret_without_readers_is_every_key_of_its_tenant_and_no_other(
    store_env: dict[str, str],
) -> None:
    secret_id = str(uuid.uuid4())
    store_one(store_env, seal(secret_id, tenant="acme"))
    assert fetch_as(store_env, secret_id, STRANGER).denied is Denied.TENANT
    assert fetch_as(store_env, secret_id, Caller()).denied is Denied.TENANT
    assert fetch_as(store_env, secret_id, NEIGHBOUR).found is Found.SECRET
    assert fetch_as(store_env, secret_id, OWNER).found is Found.SECRET
    assert delete_as(store_env, secret_id, STRANGER) is DeleteResult.DENIED_TENANT
    assert delete_as(store_env, secret_id, NEIGHBOUR) is DeleteResult.DELETED
    # The default tenant's secrets are as before: any key of it, or no key at all.
    plain = str(uuid.uuid4())
    store_one(store_env, seal(plain))
    assert fetch_as(store_env, plain, STRANGER).denied is Denied.TENANT
    assert fetch_as(store_env, plain, Caller(name="anyone")).found is Found.SECRET
    assert fetch_as(store_env, plain, Caller()).found is Found.SECRET


def _edit(raw: RawRecords, secret_id: str, **fields: Any) -> None:
    """Rewrite who may see a record, below the service, as a database edit would."""
    key = record_key(secret_id)
    if raw.kind == "sqlite":
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [
            v if not isinstance(v, list) else __import__("json").dumps(v) for v in fields.values()
        ]
        with raw._sqlite() as conn:
            conn.execute(
                f"UPDATE secrets SET {assignments} WHERE record_key = ?",  # noqa: S608 - test names
                (*values, key),
            )
        return
    raw._mongo().update_one({"_id": key}, {"$set": fields})


@pytest.mark.parametrize(
    ("edit", "caller"),
    [
        ({"tenant": "beta"}, STRANGER),  # moved to another tenant
        ({"readers": ["billing", "web"]}, NEIGHBOUR),  # another reader added
        ({"owner": "web"}, READER),  # another owner named
    ],
    ids=["tenant", "readers", "owner"],
)
def test_an_edited_record_is_never_served(
    shared: tuple[dict[str, str], str],
    raw_records: RawRecords,
    edit: dict[str, Any],
    caller: Caller,
) -> None:
    env, secret_id = shared
    _edit(raw_records, secret_id, **edit)
    with pytest.raises(DecryptionFailed):
        fetch_as(env, secret_id, caller)


def test_a_plain_record_moved_into_a_tenant_is_never_served(
    store_env: dict[str, str], raw_records: RawRecords
) -> None:
    secret_id = str(uuid.uuid4())
    store_one(store_env, seal(secret_id))
    _edit(raw_records, secret_id, tenant="acme")
    with pytest.raises(DecryptionFailed):
        fetch_as(store_env, secret_id, NEIGHBOUR)


def test_the_default_tenant_seals_as_before_tenants_existed() -> None:
    """Records stored before tenants existed still open: the associated data of a plain
    record is unchanged (its ciphertext opens as one sealed with the id and key id only)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = record_key(str(uuid.uuid4()))
    sealed = KEYRING.seal(key, b"x")
    aad = b"secret-manager/v1\x00" + sealed.key_id.encode() + b"\x00" + key.encode()
    assert AESGCM(b"k" * 32).decrypt(sealed.nonce, sealed.ciphertext, aad) == b"x"
