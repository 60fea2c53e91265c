"""Known answers for the primitives: HChaCha20 and XChaCha20-Poly1305 from
draft-irtf-cfrg-xchacha-03 (sections 2.2.1 and A.3.1), KDF1..3 from wireguard-go's kdf_test.go."""

from __future__ import annotations

import pytest

from mqtun.wireguard import crypto

pytestmark = pytest.mark.sans_io  # pure: no device, no namespace

XCHACHA_PLAINTEXT = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                     b"tip for the future, sunscreen would be it.")
XCHACHA_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XCHACHA_KEY = bytes(range(0x80, 0xA0))
XCHACHA_NONCE = bytes(range(0x40, 0x58))
XCHACHA_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a82f4e"
    "da7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2"
    "383565d3fff921f9664c97637da9768812f615c68b13b52e" "c0875924c1c7987947deafd8780acf49")


def test_hchacha20_known_answer() -> None:
    out = crypto.hchacha20(bytes(range(32)), bytes.fromhex("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


def test_xchacha20_poly1305_known_answer() -> None:
    sealed = crypto.xaead_encrypt(XCHACHA_KEY, XCHACHA_NONCE, XCHACHA_PLAINTEXT, XCHACHA_AAD)
    assert sealed == XCHACHA_SEALED
    assert crypto.xaead_decrypt(XCHACHA_KEY, XCHACHA_NONCE, sealed, XCHACHA_AAD) == \
        XCHACHA_PLAINTEXT


@pytest.mark.parametrize("change", ["ciphertext", "aad", "nonce"])
def test_xchacha20_poly1305_refuses_tampering(change: str) -> None:
    sealed, aad, nonce = bytearray(XCHACHA_SEALED), bytearray(XCHACHA_AAD), bytearray(XCHACHA_NONCE)
    {"ciphertext": sealed, "aad": aad, "nonce": nonce}[change][3] ^= 1
    with pytest.raises(crypto.InvalidTag):
        crypto.xaead_decrypt(XCHACHA_KEY, bytes(nonce), bytes(sealed), bytes(aad))


KDF_VECTORS = [
    ("746573742d6b6579", "746573742d696e707574",
     "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
     "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
     "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24"),
    ("776972656775617264", "776972656775617264",
     "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
     "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
     "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160"),
    ("", "",
     "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
     "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
     "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e"),
]


@pytest.mark.parametrize(("key", "data", "t0", "t1", "t2"), KDF_VECTORS)
def test_kdf_known_answers(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert [x.hex() for x in crypto.kdf3(k, d)] == [t0, t1, t2]
    assert [x.hex() for x in crypto.kdf2(k, d)] == [t0, t1]
    assert crypto.kdf1(k, d).hex() == t0


def test_dh_refuses_low_order_points() -> None:
    private = bytes.fromhex("a8" * 31 + "40")
    assert crypto.dh(private, bytes(32)) is None
    assert crypto.dh(private, (1).to_bytes(32, "little")) is None
    other = bytes.fromhex("b0" * 31 + "50")
    assert crypto.dh(private, crypto.public_key(other)) == \
        crypto.dh(other, crypto.public_key(private))
