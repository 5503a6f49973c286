"""Names shared by server/secagg.py and client/secagg.py: stages and message entries.

Every protocol message is a Flower "train" message whose ConfigRecord (``keys.CONFIG``)
carries ``secagg-stage``. The stages, in order (Bonawitz et al. 2017, rounds 0, 1, 2, 4;
the consistency-check round 3 is omitted: honest-but-curious server only):

1. ``setup`` (to the sampled sites, with the strategy's payload): the site computes its
   clipped contribution and answers with two fresh public keys (encryption, masking).
2. ``share-keys``: the server broadcasts the keys of the sites that answered; each site
   Shamir-shares its self-mask seed and masking secret key and returns the shares
   encrypted for each peer.
3. ``masked-input``: the server forwards the ciphertexts; each site adds its noise share,
   quantizes, masks, and returns only the masked vector.
4. ``unmask``: the server names survivors and dropouts; each site returns its shares of the
   survivors' self-mask seeds and of the dropouts' masking keys.
"""

from __future__ import annotations

SETUP = "setup"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STAGES = (SETUP, SHARE_KEYS, MASKED_INPUT, UNMASK)

# ConfigRecord entries, server -> site
STAGE = "secagg-stage"
ROUND_ID = "secagg-round"
THRESHOLD = "secagg-threshold"
SPEC_PREFIX = "secagg-"  # + clip-range, scale, modulus-bits (QuantizationSpec.to_config)
TENSOR_KEYS = "secagg-keys"  # the contribution's tensor names, in encoding order
TENSOR_NDIMS = "secagg-ndims"  # number of dimensions of each tensor
TENSOR_DIMS = "secagg-dims"  # all tensors' dimensions, concatenated
NODES = "secagg-nodes"  # share-keys: the sites whose keys are broadcast, in share order
ENC_KEYS = "secagg-enc-keys"
MASK_KEYS = "secagg-mask-keys"
SOURCES = "secagg-srcs"  # masked-input: who wrote each forwarded ciphertext
SURVIVORS = "secagg-survivors"  # unmask
DROPPED = "secagg-dropped"  # unmask
L2_BOUND = "secagg-l2-bound"  # if > 0, the site re-bounds its contribution to this L2 norm
NOISE_STD = "distributed-noise-std"  # sigma = z*C of the TOTAL noise; 0 or absent: no noise
NOISE_SPLIT = "distributed-noise-split"  # "entered" (default) or "threshold"

# ConfigRecord entries, site -> server
ENC_KEY = "secagg-enc-key"
MASK_KEY = "secagg-mask-key"
DESTINATIONS = "secagg-dsts"
CIPHERTEXTS = "secagg-ctxts"
SHARE_OWNERS = "secagg-share-owners"
SEED_SHARES = "secagg-seed-shares"  # shares of survivors' self-mask seeds
KEY_SHARES = "secagg-key-shares"  # shares of dropouts' masking secret keys

# ArrayRecord entry (in keys.ARRAYS), site -> server
MASKED = "secagg-masked"  # vector in Z_M (uint32 if M <= 2^32, else uint64)


def encode_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, list]:
    """The tensor names and shapes as ConfigRecord lists."""
    return {TENSOR_KEYS: list(shapes), TENSOR_NDIMS: [len(s) for s in shapes.values()],
            TENSOR_DIMS: [int(d) for s in shapes.values() for d in s]}


def decode_shapes(config) -> dict[str, tuple[int, ...]]:
    names, ndims, dims = list(config[TENSOR_KEYS]), list(config[TENSOR_NDIMS]), list(config[TENSOR_DIMS])
    if len(names) != len(ndims) or sum(ndims) != len(dims):
        raise ValueError("malformed secagg tensor shapes")
    shapes, offset = {}, 0
    for name, n in zip(names, ndims):
        shapes[str(name)] = tuple(int(d) for d in dims[offset:offset + n])
        offset += n
    return shapes
