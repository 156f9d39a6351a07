"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020), the protocol's math for one round:
what each client computes and what the server computes, with Flower's cryptographic
primitives (ECDH key agreement, authenticated symmetric encryption, Shamir sharing).
Transport is not here: the round layer carries these values in Flower messages.

Stages of a round over a cohort of clients with ids `cid`:
1. `Participant.advertise`: two fresh public keys, c (to encrypt shares) and s (masks).
2. `Participant.share`: Shamir shares (threshold t) of its self-mask seed b and of its
   mask private key s_sk, one for each peer, encrypted for that peer only.
3. `Participant.masked`: its integer vector + PRG(b) + sum over peers j of
   +-PRG(s_ij), modulo 2^bits. Pairwise masks cancel in the sum; the self mask hides a
   client whose pairwise masks were recovered because it was thought dropped.
   The peers are those whose shares reached it: clients lost while shares were sent are
   left out of the masks (at least t must remain).
4. `Participant.reveal`: for the survivors (who sent a masked vector) their b shares, for
   the dropped their s_sk shares, never both for one peer, and only when at least t
   clients survive.
5. `unmask`: the server sums the survivors' masked vectors and removes the masks it
   rebuilt from t shares. It never holds an individual unmasked vector.

Masks are expanded from 32-byte keys with ChaCha20 (a cryptographic stream cipher), with
the round number in the nonce; Flower's own `pseudo_rand_gen` folds its seed into 32 bits
and is not used.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.errors import ProtocolError


def prg(key: bytes, server_round: int, size: int, bits: int) -> np.ndarray:
    """`size` integers uniform modulo 2^bits (int64), expanded from a 32-byte key."""
    nonce = server_round.to_bytes(16, "little")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(8 * size)), dtype=np.uint64)
    return (raw & np.uint64((1 << bits) - 1)).astype(np.int64)


def _agree(private_bytes: bytes, public_bytes: bytes) -> bytes:
    """The 32-byte key two parties share (ECDH + HKDF)."""
    key = generate_shared_key(bytes_to_private_key(private_bytes), bytes_to_public_key(public_bytes))
    return base64.urlsafe_b64decode(key)


def _fernet_key(private_bytes: bytes, public_bytes: bytes) -> bytes:
    return base64.urlsafe_b64encode(_agree(private_bytes, public_bytes))


def _keypair() -> tuple[bytes, bytes]:
    sk, pk = generate_key_pairs()
    return private_key_to_bytes(sk), public_key_to_bytes(pk)


@dataclass(frozen=True)
class PublicKeys:
    c: bytes  # encrypts shares sent to this client
    s: bytes  # derives this client's pairwise masks


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
    _revealed: bool = False
    _masked_with: tuple[int, ...] = ()  # the peers whose masks its vector carries

    def to_state(self) -> str:
        """Everything this participant holds (its secrets included), as JSON for the
        node's own state between the round's messages; never sent."""
        return json.dumps({
            "cid": self.cid, "round": self.server_round, "bits": self.bits,
            "c": [k.hex() for k in self._c], "s": [k.hex() for k in self._s], "b": self._b.hex(),
            "peers": {str(i): [k.c.hex(), k.s.hex()] for i, k in self._peers.items()},
            "held": {str(i): [b.hex(), s.hex()] for i, (b, s) in self._held.items()},
            "threshold": self.threshold, "revealed": self._revealed,
            "masked_with": list(self._masked_with)})

    @classmethod
    def from_state(cls, text: str) -> Participant:
        d = json.loads(text)
        pair = lambda v: (bytes.fromhex(v[0]), bytes.fromhex(v[1]))  # noqa: E731
        return cls(cid=int(d["cid"]), server_round=int(d["round"]), bits=int(d["bits"]),
                   _c=pair(d["c"]), _s=pair(d["s"]), _b=bytes.fromhex(d["b"]),
                   _peers={int(i): PublicKeys(*pair(v)) for i, v in d["peers"].items()},
                   _held={int(i): pair(v) for i, v in d["held"].items()},
                   threshold=int(d["threshold"]), _revealed=bool(d["revealed"]),
                   _masked_with=tuple(int(i) for i in d["masked_with"]))

    def advertise(self) -> PublicKeys:
        return PublicKeys(c=self._c[1], s=self._s[1])

    def share(self, peers: Mapping[int, PublicKeys], threshold: int) -> dict[int, bytes]:
        """Encrypted shares of b and s_sk for every peer (the cohort, this client included)."""
        if self.cid not in peers or peers[self.cid] != self.advertise():
            raise ProtocolError(f"client {self.cid}: the cohort's keys do not hold its own")
        if len(peers) < 2:
            raise ProtocolError(f"client {self.cid}: a cohort of {len(peers)} is no aggregation")
        if not (2 * threshold > len(peers) and threshold <= len(peers)):
            # Above half the cohort: a server telling some clients "i survived" and others
            # "i dropped" cannot collect t shares of both of i's secrets (that needs 2t).
            raise ProtocolError(f"threshold {threshold} must be in ({len(peers)}/2, {len(peers)}]")
        self._peers, self.threshold = dict(peers), threshold
        ids = sorted(peers)
        b_shares = create_shares(self._b, threshold, len(ids))
        s_shares = create_shares(self._s[0], threshold, len(ids))
        out = {}
        for j, b_share, s_share in zip(ids, b_shares, s_shares, strict=True):
            text = json.dumps({"from": self.cid, "to": j, "b": b_share.hex(), "s": s_share.hex()})
            out[j] = encrypt(_fernet_key(self._c[0], peers[j].c), text.encode())
        return out

    def receive(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Shares addressed to this client (by sender); each must decrypt and say so."""
        for i, ct in ciphertexts.items():
            if i not in self._peers:
                raise ProtocolError(f"client {self.cid}: a share from {i}, not in the cohort")
            d = json.loads(decrypt(_fernet_key(self._c[0], self._peers[i].c), ct))
            if d["from"] != i or d["to"] != self.cid:
                raise ProtocolError(f"client {self.cid}: a share from {i} is misaddressed")
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

    def reveal(self, survivors: Sequence[int], dropped: Sequence[int]) -> dict[int, tuple[str, bytes]]:
        """Shares the server needs to unmask the survivors' sum: b for survivors, s_sk for
        the dropped. Refused when a peer is in both lists, is unknown, fewer than the
        threshold survive, or the server asks twice."""
        alive, gone = set(survivors), set(dropped)
        if self._revealed:
            raise ProtocolError(f"client {self.cid}: shares were already revealed this round")
        if not self._masked_with:
            raise ProtocolError(f"client {self.cid}: it has masked nothing this round")
        if alive & gone or alive | gone != set(self._masked_with):
            raise ProtocolError(f"client {self.cid}: survivors and dropped must split the cohort "
                                "it masked with")
        if self.cid not in alive:
            raise ProtocolError(f"client {self.cid}: listed as dropped, so it reveals nothing")
        if len(alive) < self.threshold:
            raise ProtocolError(f"only {len(alive)} survivors, fewer than the threshold {self.threshold}")
        self._revealed = True
        out: dict[int, tuple[str, bytes]] = {}
        for j in alive:
            out[j] = ("b", self._held[j][0])
        for j in gone:
            out[j] = ("s", self._held[j][1])
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
