"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020), the protocol's math for one round:
what each client computes and what the server computes, with Flower's cryptographic
primitives' authenticated symmetric encryption, X25519 key agreement (the `cryptography`
package) and Shamir sharing over a prime field (here).
Transport is not here: the round layer carries these values in Flower messages.

Stages of a round over a cohort of clients with ids `cid`, against a server that may
show each client a story of its own (Bonawitz et al.'s active-adversary variant):
1. `Participant.advertise`: two fresh public keys, c (to encrypt shares) and s (masks),
   which the client signs with its identity key with its record count (an `Advert`).
2. `Participant.share(view)`: the `View` is every member's signed advert and the round's
   `Params` (threshold t, field bits, scale, clip, dimension, the sum's noise level);
   the client (having checked every signature against its roster) makes Shamir shares
   (threshold t) of its self-mask seed b and of its mask private key s_sk, one for each
   member, encrypted for that member only and naming the view's digest.
3. `Participant.masked`: its integer vector + PRG(b) + sum over peers j of +-PRG(s_ij),
   modulo 2^bits. Its peers are those whose shares reached it *for the same view*: a
   member shown another cohort, threshold or noise level cannot be a peer.
4. `Participant.confirm(survivors)`: the survivor set U3 it is told, which it signs with
   the view's digest (once a round): the consistency check.
5. `Participant.reveal(signers)`: for the survivors their b shares, for the peers not
   among them their s_sk shares, only when at least t members of U3 signed exactly the
   same view and U3. Each client signs one U3 and reveals once, and its secrets were
   shared at threshold t > K/2 among members of its own view: two stories would need 2t
   signers of that view, more than it has. So no set of shares ever yields both of one
   client's secrets.
6. `unmask`: the server sums the survivors' masked vectors and removes the masks it
   rebuilt from t shares. It never holds an individual unmasked vector.

Masks are expanded from 32-byte keys with ChaCha20 (a cryptographic stream cipher), with
the round number in the nonce; Flower's own `pseudo_rand_gen` folds its seed into 32 bits
and is not used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt

from common import ddp
from common.errors import ProtocolError
from common.roster import statement


def prg(key: bytes, server_round: int, size: int, bits: int) -> np.ndarray:
    """`size` integers uniform modulo 2^bits (int64), expanded from a 32-byte key (ChaCha20;
    2, 4 or 8 bytes a value, the fewest that hold `bits`)."""
    nonce = server_round.to_bytes(16, "little")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    width = next(w for w in (2, 4, 8) if bits <= 8 * w)
    raw = np.frombuffer(stream.update(bytes(width * size)), dtype=f"<u{width}")
    return (raw.astype(np.uint64) & np.uint64((1 << bits) - 1)).astype(np.int64)


def _agree(private_bytes: bytes, public_bytes: bytes) -> bytes:
    """The 32-byte key two parties share (X25519 + HKDF-SHA256). A public key that is not
    one (or of low order) is a protocol error."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private_bytes).exchange(
            X25519PublicKey.from_public_bytes(public_bytes))
    except ValueError as exc:
        raise ProtocolError(f"unusable public key ({exc})") from exc
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dpfl-secagg").derive(shared)


# Shamir sharing over the prime field of the Mersenne prime 2^521 - 1 (any 32-byte secret
# is one element): Python's integers do the arithmetic in microseconds
SHAMIR_PRIME = 2**521 - 1
_SECRET_BYTES, _Y_BYTES = 32, 66


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Shamir shares of a 32-byte `secret`, any `threshold` of `num` needed: the values at
    x = 1..num of a polynomial of degree threshold - 1 with uniformly random coefficients
    whose constant term is the secret; each share is x (4 bytes) then the value."""
    if len(secret) != _SECRET_BYTES or not 1 <= threshold <= num:
        raise ValueError(f"shares of a {_SECRET_BYTES}-byte secret, 1 <= threshold <= num")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(SHAMIR_PRIME)
                                                for _ in range(threshold - 1)]
    out = []
    for x in range(1, num + 1):
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % SHAMIR_PRIME
        out.append(x.to_bytes(4, "little") + y.to_bytes(_Y_BYTES, "big"))
    return out


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """The weights w_i with f(0) = sum w_i f(x_i) for a polynomial of degree < len(xs)
    (the same revealers' points serve every secret of a round: computed once)."""
    weights = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % SHAMIR_PRIME
                den = den * (xj - xi) % SHAMIR_PRIME
        weights.append(num * pow(den, -1, SHAMIR_PRIME) % SHAMIR_PRIME)
    return tuple(weights)


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """The secret from `shares` (at least its threshold of them, distinct): Lagrange
    interpolation at 0. Raises ValueError for shares that cannot be one secret's."""
    if not shares or any(len(s) != 4 + _Y_BYTES for s in shares):
        raise ValueError("shares of impossible length")
    points = [(int.from_bytes(s[:4], "little"), int.from_bytes(s[4:], "big")) for s in shares]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs) or min(xs) < 1 or max(y for _, y in points) >= SHAMIR_PRIME:
        raise ValueError("shares with repeated or impossible points")
    weights = _lagrange_at_zero(tuple(xs))
    total = sum(y * w for (_, y), w in zip(points, weights, strict=True)) % SHAMIR_PRIME
    if total >> (8 * _SECRET_BYTES):
        raise ValueError("the shares do not combine to a secret")
    return total.to_bytes(_SECRET_BYTES, "big")


def _fernet_key(private_bytes: bytes, public_bytes: bytes) -> bytes:
    return base64.urlsafe_b64encode(_agree(private_bytes, public_bytes))


def _keypair() -> tuple[bytes, bytes]:
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


@dataclass(frozen=True)
class PublicKeys:
    c: bytes  # encrypts shares sent to this client
    s: bytes  # derives this client's pairwise masks


@dataclass(frozen=True)
class Advert:
    """A member's round keys and record count, as it signed them (`body`)."""

    partition: int
    keys: PublicKeys
    records: int
    signature: str = ""

    def body(self, server_round: int) -> dict:
        return {"round": server_round, "partition": self.partition, "c": self.keys.c.hex(),
                "s": self.keys.s.hex(), "records": self.records}

    def to_json(self) -> list:
        return [self.keys.c.hex(), self.keys.s.hex(), self.records, self.signature]

    @classmethod
    def from_json(cls, partition: int, raw: list) -> Advert:
        c, s, records, signature = raw
        return cls(int(partition), PublicKeys(bytes.fromhex(c), bytes.fromhex(s)),
                   int(records), str(signature))


@dataclass(frozen=True)
class Params:
    """What every member's guarantee depends on, one value for the whole cohort: the
    threshold, the field, the integer scale, the clipping bound and dimension (which fix
    the release's sensitivity) and the noise the sum of any t survivors must carry, as a
    noise multiplier (std over the rounded L2 sensitivity)."""

    server_round: int
    threshold: int
    bits: int
    scale: float
    clip: float
    dim: int
    noise_multiplier: float

    def to_json(self) -> dict:
        return {"round": self.server_round, "threshold": self.threshold, "bits": self.bits,
                "scale": self.scale, "clip": self.clip, "dim": self.dim,
                "noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_json(cls, d: Mapping) -> Params:
        return cls(server_round=int(d["round"]), threshold=int(d["threshold"]),
                   bits=int(d["bits"]), scale=float(d["scale"]), clip=float(d["clip"]),
                   dim=int(d["dim"]), noise_multiplier=float(d["noise_multiplier"]))

    @property
    def encoding(self) -> ddp.Encoding:
        """The release's encoding: the rotated, padded length, the high-probability
        rounding bound (ddp.ROUNDING_BETA: every member's and the server's alike)."""
        return ddp.Encoding(clip=self.clip, scale=self.scale, dim=ddp.padded_dim(self.dim),
                            beta=ddp.ROUNDING_BETA)


@dataclass(frozen=True)
class View:
    """A round as the server tells it to a client: the members' signed adverts and the
    round's parameters. Its digest is what members sign when they confirm survivors."""

    params: Params
    adverts: tuple[Advert, ...]

    @property
    def members(self) -> list[int]:
        return [a.partition for a in self.adverts]

    @property
    def keys(self) -> dict[int, PublicKeys]:
        return {a.partition: a.keys for a in self.adverts}

    @property
    def records(self) -> int:
        return sum(a.records for a in self.adverts)

    def to_json(self) -> str:
        return json.dumps({"params": self.params.to_json(),
                           "members": {str(a.partition): a.to_json() for a in self.adverts}})

    @classmethod
    def from_json(cls, text: str) -> View:
        d = json.loads(text)
        adverts = sorted((Advert.from_json(int(p), v) for p, v in d["members"].items()),
                         key=lambda a: a.partition)
        return cls(Params.from_json(d["params"]), tuple(adverts))

    def digest(self) -> str:
        return hashlib.sha256(statement("view", {
            "params": self.params.to_json(),
            "members": {str(a.partition): a.to_json() for a in self.adverts}})).hexdigest()

    def rotation(self) -> ddp.Rotation:
        """The round's rotation, seeded by the view's digest: the members' fresh round keys
        are in it, so no one party picks it, and every holder of the view derives it."""
        return ddp.Rotation(seed=bytes.fromhex(self.digest()), dim=self.params.dim)


def survivors_body(digest: str, server_round: int, survivors: Sequence[int]) -> dict:
    """What a member signs to confirm the survivor set of the view `digest`."""
    return {"view": digest, "round": server_round, "survivors": sorted(int(i) for i in survivors)}


@dataclass
class Participant:
    """One client's side of one round."""

    cid: int
    server_round: int
    bits: int
    _c: tuple[bytes, bytes] = field(default_factory=_keypair, repr=False)
    _s: tuple[bytes, bytes] = field(default_factory=_keypair, repr=False)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _peers: dict[int, PublicKeys] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)  # peer -> (b share, s_sk share)
    threshold: int = 0
    view: str = ""  # the digest of the view it shared under
    _revealed: bool = False
    _masked_with: tuple[int, ...] = ()  # the peers whose masks its vector carries
    _confirmed: tuple[int, ...] = ()  # the survivor set it signed

    def to_state(self) -> str:
        """Everything this participant holds (its secrets included), as JSON for the
        node's own state between the round's messages; never sent."""
        return json.dumps({
            "cid": self.cid, "round": self.server_round, "bits": self.bits,
            "c": [k.hex() for k in self._c], "s": [k.hex() for k in self._s], "b": self._b.hex(),
            "peers": {str(i): [k.c.hex(), k.s.hex()] for i, k in self._peers.items()},
            "held": {str(i): [b.hex(), s.hex()] for i, (b, s) in self._held.items()},
            "threshold": self.threshold, "view": self.view, "revealed": self._revealed,
            "masked_with": list(self._masked_with), "confirmed": list(self._confirmed)})

    @classmethod
    def from_state(cls, text: str) -> Participant:
        d = json.loads(text)
        pair = lambda v: (bytes.fromhex(v[0]), bytes.fromhex(v[1]))  # noqa: E731
        return cls(cid=int(d["cid"]), server_round=int(d["round"]), bits=int(d["bits"]),
                   _c=pair(d["c"]), _s=pair(d["s"]), _b=bytes.fromhex(d["b"]),
                   _peers={int(i): PublicKeys(*pair(v)) for i, v in d["peers"].items()},
                   _held={int(i): pair(v) for i, v in d["held"].items()},
                   threshold=int(d["threshold"]), view=str(d["view"]),
                   _revealed=bool(d["revealed"]),
                   _masked_with=tuple(int(i) for i in d["masked_with"]),
                   _confirmed=tuple(int(i) for i in d["confirmed"]))

    def advertise(self) -> PublicKeys:
        return PublicKeys(c=self._c[1], s=self._s[1])

    @property
    def confirmed(self) -> list[int]:
        """The survivor set it signed this round (empty before it confirmed)."""
        return list(self._confirmed)

    def share(self, view: View) -> dict[int, bytes]:
        """Encrypted shares of b and s_sk for every member of `view` (this client
        included), at the view's threshold; once a round. The caller has checked the
        view's signatures and parameters against its roster and policy."""
        peers, threshold = view.keys, view.params.threshold
        if self.view:
            raise ProtocolError(f"client {self.cid}: it already shared its secrets this round")
        if self.bits == 0:  # the field the view names (the run left it to the server)
            self.bits = view.params.bits
        if view.params.server_round != self.server_round or view.params.bits != self.bits:
            raise ProtocolError(f"client {self.cid}: the view is for round "
                                f"{view.params.server_round} with {view.params.bits} bits; its "
                                f"keys are for round {self.server_round} with {self.bits}")
        if self.cid not in peers or peers[self.cid] != self.advertise():
            raise ProtocolError(f"client {self.cid}: the cohort's keys do not hold its own")
        if len(peers) < 2:
            raise ProtocolError(f"client {self.cid}: a cohort of {len(peers)} is no aggregation")
        if not (2 * threshold > len(peers) and threshold <= len(peers)):
            # Above half the cohort: a server telling some clients "i survived" and others
            # "i dropped" cannot collect t shares of both of i's secrets (that needs 2t).
            raise ProtocolError(f"threshold {threshold} must be in ({len(peers)}/2, {len(peers)}]")
        self._peers, self.threshold, self.view = dict(peers), threshold, view.digest()
        ids = sorted(peers)
        b_shares = create_shares(self._b, threshold, len(ids))
        s_shares = create_shares(self._s[0], threshold, len(ids))
        out = {}
        for j, b_share, s_share in zip(ids, b_shares, s_shares, strict=True):
            text = json.dumps({"from": self.cid, "to": j, "view": self.view,
                               "b": b_share.hex(), "s": s_share.hex()})
            out[j] = encrypt(_fernet_key(self._c[0], peers[j].c), text.encode())
        return out

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Shares addressed to this client (by sender); each must decrypt, say so, and
        name the view this client shared under (a sender shown another story is no peer)."""
        if not self.view:
            raise ProtocolError(f"client {self.cid}: it has shared nothing this round")
        for i, ct in ciphertexts.items():
            if i not in self._peers:
                raise ProtocolError(f"client {self.cid}: a share from {i}, not in the cohort")
            d = json.loads(decrypt(_fernet_key(self._c[0], self._peers[i].c), ct))
            if d["from"] != i or d["to"] != self.cid:
                raise ProtocolError(f"client {self.cid}: a share from {i} is misaddressed")
            if d.get("view") != self.view:
                raise ProtocolError(f"client {self.cid}: client {i} shared under another view "
                                    "of the round (the server told it another cohort or "
                                    "parameters)")
            self._held[i] = (bytes.fromhex(d["b"]), bytes.fromhex(d["s"]))

    def check_ready(self) -> None:
        """Raises unless a vector can be masked now: not yet this round, and with shares
        from at least the threshold of peers, itself included. A client calls it before
        it trains, so that a request it cannot complete spends nothing."""
        if self._masked_with:
            raise ProtocolError(f"client {self.cid}: it already masked a vector this round")
        if self.cid not in self._held or len(self._held) < self.threshold:
            raise ProtocolError(f"client {self.cid}: shares from {len(self._held)} client(s) "
                                f"(itself {'in' if self.cid in self._held else 'not'} among "
                                f"them), fewer than the threshold {self.threshold}")

    def masked(self, value: np.ndarray) -> np.ndarray:
        """This client's integer vector, masked (modulo 2^bits) with the peers whose shares
        it received (those still in the round after the shares were sent): at least the
        threshold of them, itself included. Once per round."""
        self.check_ready()
        self._masked_with = tuple(sorted(self._held))
        value = np.asarray(value, dtype=np.int64)
        m = (1 << self.bits) - 1
        out = (value + prg(self._b, self.server_round, value.size, self.bits)) & m
        for j in self._masked_with:
            if j == self.cid:
                continue
            keys = self._peers[j]
            pair = prg(_agree(self._s[0], keys.s), self.server_round, value.size, self.bits)
            out = (out + pair if self.cid < j else out - pair) & m
        return out

    def confirm(self, survivors: Sequence[int]) -> dict:
        """The survivor set this client signs (`survivors_body`): all among its peers,
        itself included, at least the threshold; once a round."""
        alive = sorted(set(int(i) for i in survivors))
        if not self._masked_with:
            raise ProtocolError(f"client {self.cid}: it has masked nothing this round")
        if self._confirmed:
            raise ProtocolError(f"client {self.cid}: it already confirmed survivors this round")
        if not set(alive) <= set(self._masked_with):
            raise ProtocolError(f"client {self.cid}: survivors {sorted(set(alive) - set(self._masked_with))} "
                                "are not among the peers it masked with")
        if self.cid not in alive:
            raise ProtocolError(f"client {self.cid}: listed as dropped, so it confirms nothing")
        if len(alive) < self.threshold:
            raise ProtocolError(f"only {len(alive)} survivors, fewer than the threshold {self.threshold}")
        self._confirmed = tuple(alive)
        return survivors_body(self.view, self.server_round, alive)

    def reveal(self, signers: Sequence[int]) -> dict[int, tuple[str, bytes]]:
        """Shares the server needs to unmask the confirmed survivors' sum: b for the
        survivors, s_sk for its other peers. Only when at least the threshold of the
        survivors signed the same survivor set under the same view (`signers`: those
        whose signatures the caller verified), and once."""
        if self._revealed:
            raise ProtocolError(f"client {self.cid}: shares were already revealed this round")
        if not self._confirmed:
            raise ProtocolError(f"client {self.cid}: it has confirmed no survivors this round")
        valid = set(signers) & set(self._confirmed)
        if len(valid) < self.threshold:
            raise ProtocolError(f"client {self.cid}: {len(valid)} survivor(s) signed the same "
                                f"survivors and view, fewer than the threshold {self.threshold}: "
                                "it reveals nothing")
        self._revealed = True
        alive = set(self._confirmed)
        out: dict[int, tuple[str, bytes]] = {}
        for j in self._masked_with:
            out[j] = ("b", self._held[j][0]) if j in alive else ("s", self._held[j][1])
        return out


def unmask(masked: Mapping[int, np.ndarray], revealed: Sequence[Mapping[int, tuple[str, bytes]]],
           public: Mapping[int, PublicKeys], *, server_round: int, bits: int, threshold: int
           ) -> np.ndarray:
    """The sum of the survivors' vectors (centred in [-2^(bits-1), 2^(bits-1))) from their
    masked vectors and the shares the survivors revealed."""
    survivors = sorted(masked)
    dropped = sorted(set(public) - set(masked))
    if len(revealed) < threshold:
        raise ProtocolError(f"{len(revealed)} reveals, fewer than the threshold {threshold}")
    size = len(next(iter(masked.values())))
    m = (1 << bits) - 1
    total = np.zeros(size, dtype=np.int64)
    for v in masked.values():
        total = (total + v) & m

    def secret(of: int, kind: str) -> bytes:
        shares = [r[of][1] for r in revealed if of in r and r[of][0] == kind]
        if len(shares) < threshold:
            raise ProtocolError(f"{len(shares)} shares of client {of}'s {kind}, fewer than {threshold}")
        return combine_shares(shares[:threshold])

    for i in survivors:
        total = (total - prg(secret(i, "b"), server_round, size, bits)) & m
    for j in dropped:
        s_sk = secret(j, "s")
        for k in survivors:  # k added +PRG(s_kj) if k < j, else -PRG(s_kj): take it back
            pair = prg(_agree(s_sk, public[k].s), server_round, size, bits)
            total = (total - pair if k < j else total + pair) & m
    half = 1 << (bits - 1)
    return ((total + half) & m) - half
