"""tls-server-end-point channel binding data (RFC 5929 section 4.1) from DER certificates."""

from __future__ import annotations

import datetime
import hashlib
import re
import ssl
from typing import Any

import pytest

from proxy.auth import ChannelBindingError, certificate_hash, pem_to_der_certificates

# -- a minimal DER writer for synthetic certificates -------------------------------------


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + content


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray()
    for value in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


NULL = b"\x05\x00"


def _cert(algorithm: bytes, tbs_padding: int = 0) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }."""
    tbs = _seq(_tlv(0x02, b"\x01"), _tlv(0x04, b"x" * tbs_padding))
    return _seq(tbs, algorithm, _tlv(0x03, b"\x00signature"))


def _alg(oid: str, params: bytes = b"") -> bytes:
    return _seq(_oid(oid) + params)


def _pss(params: bytes | None) -> bytes:
    return _alg("1.2.840.113549.1.1.10", b"" if params is None else params)


def _expected(alg: str, der: bytes) -> bytes:
    return hashlib.new(alg, der).digest()


# Independent of the module's table: RFC 8017 A.2.4, RFC 3279, RFC 5758, NIST CSOR.
SIGNATURE_OIDS = [
    ("1.2.840.113549.1.1.4", "sha256"),  # md5WithRSAEncryption -> SHA-256
    ("1.2.840.113549.1.1.5", "sha256"),  # sha1WithRSAEncryption -> SHA-256
    ("1.3.14.3.2.29", "sha256"),  # OIW sha1WithRSASignature -> SHA-256
    ("1.2.840.10045.4.1", "sha256"),  # ecdsa-with-SHA1 -> SHA-256
    ("1.2.840.10040.4.3", "sha256"),  # id-dsa-with-sha1 -> SHA-256
    ("1.2.840.113549.1.1.14", "sha224"),
    ("1.2.840.113549.1.1.11", "sha256"),
    ("1.2.840.113549.1.1.12", "sha384"),
    ("1.2.840.113549.1.1.13", "sha512"),
    ("1.2.840.113549.1.1.15", "sha512_224"),
    ("1.2.840.113549.1.1.16", "sha512_256"),
    ("1.2.840.10045.4.3.1", "sha224"),
    ("1.2.840.10045.4.3.2", "sha256"),
    ("1.2.840.10045.4.3.3", "sha384"),
    ("1.2.840.10045.4.3.4", "sha512"),
    ("2.16.840.1.101.3.4.3.1", "sha224"),  # dsa-with-sha224
    ("2.16.840.1.101.3.4.3.2", "sha256"),  # dsa-with-sha256
    ("2.16.840.1.101.3.4.3.3", "sha384"),
    ("2.16.840.1.101.3.4.3.4", "sha512"),
    ("2.16.840.1.101.3.4.3.10", "sha3_256"),  # ecdsa-with-sha3-256
    ("2.16.840.1.101.3.4.3.14", "sha3_256"),  # rsassa-pkcs1-v1_5-with-sha3-256
    ("2.16.840.1.101.3.4.3.16", "sha3_512"),
]


@pytest.mark.parametrize(("oid", "alg"), SIGNATURE_OIDS)
def test_signature_algorithms(oid: str, alg: str) -> None:
    for der in (_cert(_alg(oid)), _cert(_alg(oid, NULL))):
        assert certificate_hash(der) == _expected(alg, der)


def test_long_form_lengths() -> None:
    # A tbsCertificate past 127 and past 65535 bytes uses two- and three-octet lengths.
    for padding in (200, 70000):
        der = _cert(_alg("1.2.840.113549.1.1.12"), padding)
        assert certificate_hash(der) == _expected("sha384", der)


HASH_SHA1 = _seq(_oid("1.3.14.3.2.26"), NULL)
HASH_SHA384 = _seq(_oid("2.16.840.1.101.3.4.2.2"), NULL)
HASH_SHA512 = _seq(_oid("2.16.840.1.101.3.4.2.3"))
MGF1_SHA384 = _seq(_oid("1.2.840.113549.1.1.8"), HASH_SHA384)


@pytest.mark.parametrize(
    ("params", "alg"),
    [
        (None, "sha256"),  # no parameters: every default, SHA-1 -> SHA-256
        (_seq(), "sha256"),  # empty RSASSA-PSS-params: the same
        (_seq(_tlv(0xA0, HASH_SHA1)), "sha256"),
        (
            _seq(_tlv(0xA0, HASH_SHA384), _tlv(0xA1, MGF1_SHA384), _tlv(0xA2, b"\x02\x01\x30")),
            "sha384",
        ),
        (_seq(_tlv(0xA0, HASH_SHA512)), "sha512"),
        (_seq(_tlv(0xA1, MGF1_SHA384)), "sha256"),  # hashAlgorithm omitted, mgf given
        (_seq(_tlv(0xA2, b"\x02\x01\x20")), "sha256"),
    ],
)
def test_rsassa_pss_parameters(params: bytes | None, alg: str) -> None:
    der = _cert(_pss(params))
    assert certificate_hash(der) == _expected(alg, der)


def test_rsassa_pss_unknown_hash() -> None:
    shake = _seq(_oid("2.16.840.1.101.3.4.2.11"))
    with pytest.raises(
        ChannelBindingError, match=r"RSASSA-PSS hash 2\.16\.840\.1\.101\.3\.4\.2\.11"
    ):
        certificate_hash(_cert(_pss(_seq(_tlv(0xA0, shake)))))


@pytest.mark.parametrize(
    "params",
    [
        NULL,  # not a SEQUENCE
        _seq() + _seq(),  # something after the parameters
        _seq(_tlv(0xA0, _oid("1.3.14.3.2.26"))),  # [0] without the AlgorithmIdentifier
        _seq(_tlv(0xA0, _seq(NULL))),  # AlgorithmIdentifier without an OID
    ],
)
def test_rsassa_pss_malformed(params: bytes) -> None:
    with pytest.raises(ChannelBindingError, match="malformed certificate"):
        certificate_hash(_cert(_pss(params)))


@pytest.mark.parametrize(
    ("oid", "name"),
    [
        ("1.3.101.112", "Ed25519"),
        ("1.3.101.113", "Ed448"),
        ("2.16.840.1.101.3.4.3.17", "ML-DSA-44"),
    ],
)
def test_algorithms_without_a_hash(oid: str, name: str) -> None:
    with pytest.raises(ChannelBindingError) as info:
        certificate_hash(_cert(_alg(oid)))
    assert str(info.value) == (
        f"certificate signature algorithm {name} has no hash for tls-server-end-point; "
        "SCRAM-SHA-256-PLUS cannot be offered"
    )


@pytest.mark.parametrize(
    "oid",
    [
        "1.2.840.113549.1.1.1",  # rsaEncryption is a key type, not a signature algorithm
        "1.2.840.113549.1.1.2",  # md2WithRSAEncryption
        "1.2.3.4.5",
        "2.999.1",
    ],
)
def test_unknown_algorithms(oid: str) -> None:
    with pytest.raises(ChannelBindingError, match=re.escape(f"algorithm {oid} is not supported")):
        certificate_hash(_cert(_alg(oid)))


GOOD = _cert(_alg("1.2.840.113549.1.1.11"))


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x30",
        b"garbage that is not DER at all",
        b"\x30\x80" + GOOD[2:] + b"\x00\x00",  # indefinite length
        GOOD[:-1],  # truncated
        GOOD + b"\x00",  # trailing bytes
        b"\x31" + GOOD[1:],  # SET, not SEQUENCE
        b"\x30\x85\x00\x00\x00\x00\x01\x00",  # five length octets
        b"\x30\x84\xff\xff\xff\xff",  # length past the end
        _seq(_seq(), _alg("1.2.840.113549.1.1.11")),  # no signature
        _seq(_seq(), _alg("1.2.840.113549.1.1.11"), _tlv(0x03, b"\x00"), _tlv(0x03, b"\x00")),
        _seq(_tlv(0x02, b"\x01"), _alg("1.2.840.113549.1.1.11"), _tlv(0x03, b"\x00")),
        _seq(_seq(), _tlv(0x06, b"\x2a"), _tlv(0x03, b"\x00")),  # OID not in a SEQUENCE
        _cert(_seq(NULL)),  # AlgorithmIdentifier without an OID
        _cert(_seq(_tlv(0x06, b""))),  # empty OID
        _cert(_seq(_tlv(0x06, b"\x2a\x86"))),  # OID ending mid-subidentifier
        _cert(_seq(_tlv(0x06, b"\x2a\x80\x01"))),  # non-minimal subidentifier
        _cert(_seq(b"\x1f\x01\x00")),  # multi-byte tag
    ],
)
def test_malformed_der(der: bytes) -> None:
    with pytest.raises(ChannelBindingError, match="malformed certificate"):
        certificate_hash(der)


def test_errors_are_value_errors() -> None:
    assert issubclass(ChannelBindingError, ValueError)


# -- real certificates made with cryptography --------------------------------------------


@pytest.fixture(scope="module")
def crypto() -> Any:
    return pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def rsa_key(crypto: Any) -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _builder(public_key: Any) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgmux test")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
    )


def _der(cert: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    der: bytes = cert.public_bytes(Encoding.DER)
    return der


@pytest.mark.parametrize(
    ("hash_name", "expected"),
    [
        ("SHA224", "sha224"),
        ("SHA256", "sha256"),
        ("SHA384", "sha384"),
        ("SHA512", "sha512"),
        ("SHA3_256", "sha3_256"),
    ],
)
def test_rsa_certificates(rsa_key: Any, hash_name: str, expected: str) -> None:
    from cryptography.hazmat.primitives import hashes

    der = _der(_builder(rsa_key.public_key()).sign(rsa_key, getattr(hashes, hash_name)()))
    assert certificate_hash(der) == _expected(expected, der)


def test_rsa_sha1_certificate(rsa_key: Any) -> None:
    """A real sha1WithRSAEncryption certificate; its hash is SHA-256 (RFC 5929 4.1).

    cryptography refuses to issue SHA-1 certificates, so take a SHA-256 one, swap the
    algorithm identifier (same length: only the last OID octet differs) and re-sign the
    tbsCertificate with SHA-1.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    template = _builder(rsa_key.public_key()).sign(rsa_key, hashes.SHA256())
    sha256_rsa = _alg("1.2.840.113549.1.1.11", NULL)
    sha1_rsa = _alg("1.2.840.113549.1.1.5", NULL)
    assert template.tbs_certificate_bytes.count(sha256_rsa) == 1
    tbs = template.tbs_certificate_bytes.replace(sha256_rsa, sha1_rsa)
    signature = rsa_key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    der = _seq(tbs, sha1_rsa, _tlv(0x03, b"\x00" + signature))

    cert = x509.load_der_x509_certificate(der)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha1"
    rsa_key.public_key().verify(cert.signature, tbs, padding.PKCS1v15(), hashes.SHA1())
    assert certificate_hash(der) == _expected("sha256", der)
    assert certificate_hash(der) != _expected("sha1", der)


@pytest.mark.parametrize(("hash_name", "expected"), [("SHA256", "sha256"), ("SHA512", "sha512")])
def test_rsa_pss_certificates(rsa_key: Any, hash_name: str, expected: str) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    algorithm = getattr(hashes, hash_name)()
    pss = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
    cert = _builder(rsa_key.public_key()).sign(rsa_key, algorithm, rsa_padding=pss)
    assert cert.signature_algorithm_oid.dotted_string == "1.2.840.113549.1.1.10"
    der = _der(cert)
    assert certificate_hash(der) == _expected(expected, der)


@pytest.mark.parametrize(
    ("curve", "hash_name", "expected"),
    [
        ("SECP256R1", "SHA256", "sha256"),
        ("SECP384R1", "SHA384", "sha384"),
        ("SECP521R1", "SHA512", "sha512"),
    ],
)
def test_ecdsa_certificates(crypto: Any, curve: str, hash_name: str, expected: str) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(getattr(ec, curve)())
    der = _der(_builder(key.public_key()).sign(key, getattr(hashes, hash_name)()))
    assert certificate_hash(der) == _expected(expected, der)


# Newer cryptography releases warn that DSA is deprecated; DSA certificates still exist.
@pytest.mark.filterwarnings("ignore:DSA is deprecated")
def test_dsa_certificate(crypto: Any) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import dsa

    key = dsa.generate_private_key(key_size=1024)
    der = _der(_builder(key.public_key()).sign(key, hashes.SHA256()))
    assert certificate_hash(der) == _expected("sha256", der)


@pytest.mark.parametrize("kind", ["ed25519", "ed448"])
def test_eddsa_certificates_have_no_hash(crypto: Any, kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    module = ed25519.Ed25519PrivateKey if kind == "ed25519" else ed448.Ed448PrivateKey
    key = module.generate()
    der = _der(_builder(key.public_key()).sign(key, None))
    name = "Ed25519" if kind == "ed25519" else "Ed448"
    with pytest.raises(ChannelBindingError, match=f"^certificate signature algorithm {name} "):
        certificate_hash(der)


# -- PEM -------------------------------------------------------------------------------


def test_pem_chain_with_key(rsa_key: Any) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    leaf = _builder(rsa_key.public_key()).sign(rsa_key, hashes.SHA384())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _builder(ca_key.public_key()).sign(ca_key, hashes.SHA256())
    key_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    pem = (
        "subject=CN=pgmux test\n"
        + ssl.DER_cert_to_PEM_cert(_der(leaf))
        + key_pem
        + "\n"
        + ssl.DER_cert_to_PEM_cert(_der(ca)).replace("\n", "\r\n")
    )
    ders = pem_to_der_certificates(pem)
    assert ders == [_der(leaf), _der(ca)]
    assert certificate_hash(ders[0]) == _expected("sha384", ders[0])


def test_pem_without_certificates() -> None:
    assert pem_to_der_certificates("") == []
    assert (
        pem_to_der_certificates("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        == []
    )


def test_pem_errors() -> None:
    good = ssl.DER_cert_to_PEM_cert(GOOD)
    assert pem_to_der_certificates(good) == [GOOD]
    with pytest.raises(ChannelBindingError, match="without its END line"):
        pem_to_der_certificates(good + "-----BEGIN CERTIFICATE-----\nMIIB\n")
    with pytest.raises(ChannelBindingError, match="PEM certificate 2 is not valid base64"):
        pem_to_der_certificates(
            good + "-----BEGIN CERTIFICATE-----\nMIIBx\n-----END CERTIFICATE-----\n"
        )
    with pytest.raises(ChannelBindingError, match="PEM certificate 1 is not valid base64"):
        pem_to_der_certificates("-----BEGIN CERTIFICATE-----\nMIIé\n-----END CERTIFICATE-----")
