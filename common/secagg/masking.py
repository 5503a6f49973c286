"""Masks, key agreement and secret sharing of SecAgg (Bonawitz et al., CCS 2017).

Site u holds an input y_u in Z_M and sends

    z_u = y_u + PRG(b_u) + sum_{v != u} Delta_{u,v} * PRG(s_{u,v})   (mod M)

with Delta_{u,v} = +1 if u < v and -1 if u > v, ``b_u`` a fresh random self-mask seed and
``s_{u,v} = KA(s_u^SK, s_v^PK)`` the ECDH-agreed pairwise seed (the same for u and v). Over
all sites the pairwise terms cancel, so sum_u z_u = sum_u y_u + sum_u PRG(b_u). Each site
Shamir-shares ``b_u`` and ``s_u^SK`` among the others with threshold t. To unmask, the server
asks the surviving sites, for every survivor u, for a share of b_u (so it can remove PRG(b_u)),
and for every site u that dropped after the masks were fixed, for a share of s_u^SK (so it
can recompute the pairwise masks the survivors still carry towards u). An honest site never
gives out both kinds of share for the same u, so the server never learns an individual y_u.

Primitives are Flower's (``flwr.common.secure_aggregation``): EC key pairs on SECP384R1,
ECDH + HKDF-SHA256 key agreement, Fernet authenticated encryption, Shamir over GF(2^128)
(pycryptodome). The mask PRG is NOT Flower's ``pseudo_rand_gen``: that folds the seed into 32
bits and draws from MT19937 with ``randint(0, M - 1)`` (2^32 seeds can be searched, MT19937 is
not a cryptographic generator, and the top value is never drawn). Here a mask is AES-256 in
counter mode keyed by HKDF-SHA256(seed, label): every 64-bit word is uniform, and for M = 2^k
(k <= 64) its low k bits are uniform in Z_M.
"""

from __future__ import annotations

import base64

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.secagg.quantization import QuantizationSpec

SEED_BYTES = 32
_SHARE_INDEX_BYTES = 4  # Flower's shares start with a 4-byte little-endian share index


# ---- keys and key agreement ---------------------------------------------------------------
def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh EC key pair as (private PEM, public PEM)."""
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def agree(private_pem: bytes, peer_public_pem: bytes) -> bytes:
    """The 32-byte secret both ends derive by ECDH + HKDF-SHA256 (symmetric in the pair)."""
    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(private_pem),
                                                        bytes_to_public_key(peer_public_pem)))


def encrypt_shares(private_pem: bytes, peer_public_pem: bytes, src: int, dst: int, seed_share: bytes,
                   key_share: bytes) -> bytes:
    """Authenticated encryption of the shares ``src`` gives ``dst``, under their agreed key."""
    key = generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(peer_public_pem))
    return encrypt(key, share_keys_plaintext_concat(src, dst, seed_share, key_share))


def decrypt_shares(private_pem: bytes, peer_public_pem: bytes, src: int, dst: int, ciphertext: bytes) -> tuple[bytes, bytes]:
    """(seed share, key share) from ``src``'s ciphertext; raises if it was not meant for ``dst``."""
    key = generate_shared_key(bytes_to_private_key(private_pem), bytes_to_public_key(peer_public_pem))
    actual_src, actual_dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, ciphertext))
    if (actual_src, actual_dst) != (src, dst):
        raise ValueError(f"ciphertext routed as {src}->{dst} was written for {actual_src}->{actual_dst}")
    return seed_share, key_share


# ---- Shamir secret sharing ---------------------------------------------------------------
def share_secret(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` Shamir shares of ``secret``; any ``threshold`` of them reconstruct it."""
    if not (1 <= threshold <= num):
        raise ValueError(f"need 1 <= threshold <= num, got threshold={threshold}, num={num}")
    return create_shares(secret, threshold, num)


def reconstruct_secret(shares: list[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares with distinct indices.

    With fewer than t shares Shamir's scheme carries no information about the secret, so
    this refuses rather than returning a wrong value.
    """
    indices = {bytes(share[:_SHARE_INDEX_BYTES]) for share in shares}
    if len(indices) < threshold:
        raise ValueError(f"{len(indices)} distinct shares cannot reconstruct a secret shared with threshold {threshold}")
    return combine_shares(list(shares))


# ---- masks -------------------------------------------------------------------------------
def prg(seed: bytes, length: int, spec: QuantizationSpec, label: str) -> np.ndarray:
    """``length`` uniform elements of Z_M (uint64) expanded from ``seed``; ``label`` separates
    the uses of one seed (self mask vs pairwise mask, round)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=f"privadapt-secagg/{label}".encode()).derive(seed)
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * (8 * length))
    return spec.reduce(np.frombuffer(stream, dtype="<u8").astype(np.uint64))


def self_mask(seed: bytes, length: int, spec: QuantizationSpec, round_id: int) -> np.ndarray:
    """PRG(b_u): the mask only site u (or t share holders) can remove."""
    return prg(seed, length, spec, f"self/{round_id}")


def pairwise_mask(shared: bytes, length: int, spec: QuantizationSpec, round_id: int, own: int, peer: int) -> np.ndarray:
    """Delta_{own,peer} * PRG(s_{own,peer}) mod M: what ``own`` adds for ``peer``. The two
    ends' terms are negatives of each other mod M."""
    low, high = sorted((own, peer))
    stream = prg(shared, length, spec, f"pair/{round_id}/{low}/{high}")
    return stream if own < peer else spec.reduce(np.zeros_like(stream) - stream)


def mask_input(encoded: np.ndarray, *, spec: QuantizationSpec, round_id: int, own: int, self_seed: bytes,
               mask_private_key: bytes, peer_mask_keys: dict[int, bytes]) -> np.ndarray:
    """z_u: the encoded input plus the self mask and one pairwise mask per peer, mod M."""
    length = len(encoded)
    masked = encoded.astype(np.uint64) + self_mask(self_seed, length, spec, round_id)
    for peer, public in peer_mask_keys.items():
        if peer == own:
            raise ValueError("a site does not mask with itself")
        masked = masked + pairwise_mask(agree(mask_private_key, public), length, spec, round_id, own, peer)
    return spec.reduce(masked)


def unmask_sum(masked_sum: np.ndarray, *, spec: QuantizationSpec, round_id: int, self_seeds: dict[int, bytes],
               dropped_keys: dict[int, bytes], mask_public_keys: dict[int, bytes]) -> np.ndarray:
    """The sum of the survivors' encoded inputs, mod M, from the sum of their masked inputs.

    Args:
        masked_sum: sum of z_u over the survivors, mod M.
        self_seeds: b_u of every survivor u (reconstructed from shares).
        dropped_keys: s_u^SK of every site u that received masks but sent no masked input.
        mask_public_keys: s_v^PK of every survivor v.
    """
    length = len(masked_sum)
    total = masked_sum.astype(np.uint64)
    for seed in self_seeds.values():
        total = total - self_mask(seed, length, spec, round_id)
    for dropped, private in dropped_keys.items():
        for survivor in self_seeds:
            # survivor added Delta_{survivor,dropped} PRG(s); nothing from ``dropped`` cancels it
            shared = agree(private, mask_public_keys[survivor])
            total = total - pairwise_mask(shared, length, spec, round_id, survivor, dropped)
    return spec.reduce(total)
