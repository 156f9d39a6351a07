"""Who may be in a secure-aggregation cohort, and how members sign what they say in a round.

The roster is the federation's list of members the data holder trusts: a JSON file its
operator gives the node (node config `roster`),

    {"members": {"0": "ssh-ed25519 AAAA...", "1": "ecdsa-sha2-nistp384 AAAA...", ...},
     "issuer": "ssh-ed25519 AAAA...", "signature": "<hex>"}

one partition id per member with the public half of its identity key, in OpenSSH format
(the format Flower's node authentication registers, so a deployed node's identity key is
its authentication key pair). `issuer` and `signature` are optional: a node whose config
names `roster-issuer` accepts only a roster that key signed, so the file itself may come
by any channel. In simulation the harness is the issuer (it makes every key).

Every signature covers a domain tag, the kind of statement and its canonical JSON, so a
signature of one kind (a round key, a view, a survivor set) never passes for another.
Ed25519 and ECDSA (P-256/P-384, SHA-256) keys are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from common.errors import ConfigError
from common.files import atomic_write_text

DOMAIN = b"dpfl-secagg-v1\x00"
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def statement(kind: str, body: Any) -> bytes:
    """The bytes a signature of `kind` covers: the domain, the kind, canonical JSON."""
    return DOMAIN + kind.encode() + b"\x00" + json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode()


def sign(key: PrivateKey, kind: str, body: Any) -> str:
    """A signature (hex) of the statement (`kind`, `body`)."""
    data = statement(kind, body)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data).hex()
    return key.sign(data, ec.ECDSA(hashes.SHA256())).hex()


def verify(public: PublicKey, kind: str, body: Any, signature: str) -> bool:
    """Whether `signature` (hex) is `public`'s signature of (`kind`, `body`)."""
    try:
        sig = bytes.fromhex(signature)
        data = statement(kind, body)
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, data)
        else:
            public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def openssh(public: PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode()


def parse_public(text: str, where: str) -> PublicKey:
    """An OpenSSH public key (Ed25519 or ECDSA)."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"{where}: an {type(key).__name__}; identity keys are Ed25519 or ECDSA")
    return key


def load_identity(path: str | Path) -> PrivateKey:
    """A node's identity key: a PEM private key (PKCS#8, OpenSSL or OpenSSH, the format of
    Flower's node authentication keys), Ed25519 or ECDSA."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
        key = (serialization.load_ssh_private_key(data, password=None)
               if b"OPENSSH PRIVATE KEY" in data
               else serialization.load_pem_private_key(data, password=None))
    except OSError as exc:
        raise ConfigError(f"node config identity-key: cannot read {p} ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"node config identity-key: {p} is not a PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(f"node config identity-key: {p} holds an {type(key).__name__}; "
                          "identity keys are Ed25519 or ECDSA")
    return key


def new_identity(path: Path) -> PrivateKey:
    """A fresh Ed25519 identity key written to `path` (PEM, owner-only); never overwrites."""
    if path.exists():
        raise FileExistsError(f"{path} exists: an identity key is never replaced")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, pem.decode())  # mkstemp: owner-only
    return key


@dataclass(frozen=True)
class Roster:
    """The members a node accepts in a cohort: partition id -> identity public key."""

    members: Mapping[int, PublicKey]

    def key_of(self, partition: int) -> PublicKey | None:
        return self.members.get(partition)

    def verify(self, partition: int, kind: str, body: Any, signature: str) -> bool:
        """Whether roster member `partition` signed (`kind`, `body`)."""
        key = self.members.get(partition)
        return key is not None and verify(key, kind, body, signature)

    @classmethod
    def load(cls, path: str | Path, issuer: str = "") -> Roster:
        """The roster in `path`; with `issuer` (an OpenSSH public key, or a file holding
        one), only if that key signed it."""
        p = Path(path).expanduser()
        where = f"node config roster ({p})"
        try:
            doc = json.loads(p.read_text())
            members = {int(k): parse_public(str(v), f"{where}: member {k}")
                       for k, v in dict(doc["members"]).items()}
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{where}: not a roster ({exc!r}); expected "
                              '{"members": {"<partition>": "<OpenSSH public key>", ...}}') from exc
        if not members:
            raise ConfigError(f"{where}: no members")
        if issuer:
            text = Path(issuer).expanduser().read_text() if not issuer.startswith(
                ("ssh-", "ecdsa-")) else issuer
            signer = parse_public(text, "node config roster-issuer")
            body = {str(k): openssh(v) for k, v in sorted(members.items())}
            if not verify(signer, "roster", body, str(doc.get("signature", ""))):
                raise ConfigError(f"{where}: not signed by the key in node config roster-issuer")
        return cls(members)


def write_roster(path: Path, members: Mapping[int, str], issuer: PrivateKey | None = None
                 ) -> None:
    """A roster file of `members` (partition -> OpenSSH public key), signed by `issuer`."""
    body = {str(k): v.strip() for k, v in sorted(members.items())}
    doc: dict[str, Any] = {"members": body}
    if issuer is not None:
        canonical = {str(k): openssh(parse_public(v, f"member {k}")) for k, v in body.items()}
        doc["issuer"] = openssh(issuer.public_key())
        doc["signature"] = sign(issuer, "roster", canonical)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def issue(folder: Path, partitions: range | list[int]) -> Path:
    """A simulation's roster (the harness is its issuer): one fresh Ed25519 identity key
    per partition in `folder` (identity-<p>.key, owner-only) and `roster.json`. Keys that
    exist are kept (a resumed run's members keep their identities)."""
    members = {}
    for p in partitions:
        path = identity_file(folder, p)
        key = load_identity(path) if path.exists() else new_identity(path)
        members[p] = openssh(key.public_key())
    roster = folder / "roster.json"
    write_roster(roster, members)
    return roster


def identity_file(folder: Path, partition: int) -> Path:
    return Path(folder) / f"identity-{partition}.key"
