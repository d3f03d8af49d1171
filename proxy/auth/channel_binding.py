"""Channel binding data for SCRAM-SHA-256-PLUS: tls-server-end-point (RFC 5929 section 4).

The data is a hash of the server's DER certificate, made with the hash function of the
certificate's signature algorithm, except that MD5 and SHA-1 become SHA-256 (RFC 5929
section 4.1). It is the only channel binding type PostgreSQL implements (the PostgreSQL
docs, "SASL Authentication"; be_tls_get_certificate_hash() in be-secure-openssl.c).
A DER reader just deep enough to find the signature algorithm lives here too.
"""

import hashlib
import re
import ssl


class ChannelBindingError(ValueError):
    """The certificate cannot give tls-server-end-point data (malformed, or no hash)."""


# Signature algorithm OID -> the hashlib name of its hash. Sources: RFC 8017 appendix
# A.2.4 (RSA PKCS #1 v1.5), RFC 3279 section 2.2 and RFC 5758 section 3 (DSA, ECDSA),
# NIST's Computer Security Objects Register, sigAlgs arc 2.16.840.1.101.3.4.3 (DSA with
# SHA-2, SHA-3 variants).
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.4": "md5",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha1",  # sha1WithRSAEncryption
    "1.3.14.3.2.29": "sha1",  # sha-1WithRSASignature (OIW)
    "1.2.840.113549.1.1.14": "sha224",  # sha224WithRSAEncryption
    "1.2.840.113549.1.1.11": "sha256",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12": "sha384",  # sha384WithRSAEncryption
    "1.2.840.113549.1.1.13": "sha512",  # sha512WithRSAEncryption
    "1.2.840.113549.1.1.15": "sha512_224",  # sha512-224WithRSAEncryption
    "1.2.840.113549.1.1.16": "sha512_256",  # sha512-256WithRSAEncryption
    "1.2.840.10045.4.1": "sha1",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",  # ecdsa-with-SHA224
    "1.2.840.10045.4.3.2": "sha256",  # ecdsa-with-SHA256
    "1.2.840.10045.4.3.3": "sha384",  # ecdsa-with-SHA384
    "1.2.840.10045.4.3.4": "sha512",  # ecdsa-with-SHA512
    "1.2.840.10040.4.3": "sha1",  # id-dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # id-dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # id-dsa-with-sha256
    "2.16.840.1.101.3.4.3.3": "sha384",  # id-dsa-with-sha384
    "2.16.840.1.101.3.4.3.4": "sha512",  # id-dsa-with-sha512
    "2.16.840.1.101.3.4.3.9": "sha3_224",  # id-ecdsa-with-sha3-224
    "2.16.840.1.101.3.4.3.10": "sha3_256",  # id-ecdsa-with-sha3-256
    "2.16.840.1.101.3.4.3.11": "sha3_384",  # id-ecdsa-with-sha3-384
    "2.16.840.1.101.3.4.3.12": "sha3_512",  # id-ecdsa-with-sha3-512
    "2.16.840.1.101.3.4.3.13": "sha3_224",  # id-rsassa-pkcs1-v1_5-with-sha3-224
    "2.16.840.1.101.3.4.3.14": "sha3_256",  # id-rsassa-pkcs1-v1_5-with-sha3-256
    "2.16.840.1.101.3.4.3.15": "sha3_384",  # id-rsassa-pkcs1-v1_5-with-sha3-384
    "2.16.840.1.101.3.4.3.16": "sha3_512",  # id-rsassa-pkcs1-v1_5-with-sha3-512
}

# id-RSASSA-PSS (RFC 4055 section 3.1): the hash is in the parameters.
_RSASSA_PSS = "1.2.840.113549.1.1.10"

# Hash algorithm OIDs for RSASSA-PSS-params.hashAlgorithm: RFC 3279 section 2.2.1 (MD5,
# SHA-1) and NIST's hashAlgs arc 2.16.840.1.101.3.4.2 (SHA-2, SHA-3).
_HASH_OIDS = {
    "1.2.840.113549.2.5": "md5",
    "1.3.14.3.2.26": "sha1",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.5": "sha512_224",
    "2.16.840.1.101.3.4.2.6": "sha512_256",
    "2.16.840.1.101.3.4.2.7": "sha3_224",
    "2.16.840.1.101.3.4.2.8": "sha3_256",
    "2.16.840.1.101.3.4.2.9": "sha3_384",
    "2.16.840.1.101.3.4.2.10": "sha3_512",
}

# Signature algorithms that sign the message itself, with no separate hash (RFC 8410
# section 3 for EdDSA; FIPS 204 / the NIST register for ML-DSA). PostgreSQL fails the
# same way: OpenSSL reports no digest for them.
_NO_HASH = {
    "1.3.101.112": "Ed25519",
    "1.3.101.113": "Ed448",
    "2.16.840.1.101.3.4.3.17": "ML-DSA-44",
    "2.16.840.1.101.3.4.3.18": "ML-DSA-65",
    "2.16.840.1.101.3.4.3.19": "ML-DSA-87",
}

# RFC 5929 section 4.1: "if the certificate's signatureAlgorithm uses ... MD5 or SHA-1,
# then use SHA-256".
_UPGRADED = frozenset({"md5", "sha1"})

# DER tags (X.690 section 8): universal SEQUENCE, OID, BIT STRING, and the [0] EXPLICIT
# context tag of RSASSA-PSS-params.hashAlgorithm.
_SEQUENCE = 0x30
_OID = 0x06
_BIT_STRING = 0x03
_CONTEXT_0 = 0xA0

_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_BLOCK_RE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL)

_CANNOT_OFFER = "SCRAM-SHA-256-PLUS cannot be offered"


def certificate_hash(der: bytes) -> bytes:
    """The tls-server-end-point channel binding data for the DER certificate `der`."""
    name = _hash_name(der)
    if name in _UPGRADED:
        name = "sha256"
    try:
        return hashlib.new(name, der).digest()
    except ValueError:
        # Only a Python built without OpenSSL lacks sha512_224 / sha512_256.
        raise ChannelBindingError(
            f"hash {name} is not available in this Python; {_CANNOT_OFFER}"
        ) from None


def pem_to_der_certificates(pem: str) -> list[bytes]:
    """Each CERTIFICATE block of `pem` as DER, in file order (the leaf comes first).

    Other blocks (a private key in the same file) are skipped; no block gives [].
    """
    blocks = _PEM_BLOCK_RE.findall(pem)
    if len(blocks) != pem.count(_PEM_BEGIN):
        raise ChannelBindingError("PEM certificate block without its END line")
    ders: list[bytes] = []
    for number, block in enumerate(blocks, start=1):
        try:
            ders.append(ssl.PEM_cert_to_DER_cert(block))
        except ValueError:
            raise ChannelBindingError(f"PEM certificate {number} is not valid base64") from None
    return ders


# -- reading the certificate -----------------------------------------------------------


def _hash_name(der: bytes) -> str:
    """The hashlib name of the hash in the certificate's signatureAlgorithm.

    RFC 5280 section 4.1: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE,
    signatureAlgorithm AlgorithmIdentifier, signatureValue BIT STRING }, and
    AlgorithmIdentifier ::= SEQUENCE { algorithm OID, parameters ANY OPTIONAL }.
    """
    tag, start, end = _element(der, 0, len(der))
    if tag != _SEQUENCE or end != len(der):
        raise ChannelBindingError("malformed certificate: not a single DER SEQUENCE")
    tag, _, pos = _element(der, start, end)
    if tag != _SEQUENCE:
        raise ChannelBindingError("malformed certificate: tbsCertificate is not a SEQUENCE")
    tag, alg_start, alg_end = _element(der, pos, end)
    if tag != _SEQUENCE:
        raise ChannelBindingError("malformed certificate: signatureAlgorithm is not a SEQUENCE")
    tag, _, sig_end = _element(der, alg_end, end)
    if tag != _BIT_STRING or sig_end != end:
        raise ChannelBindingError("malformed certificate: expected the signature BIT STRING last")

    oid, params_start = _algorithm_oid(der, alg_start, alg_end)
    if oid == _RSASSA_PSS:
        return _pss_hash_name(der, params_start, alg_end)
    name = _SIGNATURE_HASHES.get(oid)
    if name is not None:
        return name
    if oid in _NO_HASH:
        raise ChannelBindingError(
            f"certificate signature algorithm {_NO_HASH[oid]} has no hash for "
            f"tls-server-end-point; {_CANNOT_OFFER}"
        )
    raise ChannelBindingError(
        f"certificate signature algorithm {oid} is not supported for tls-server-end-point; "
        f"{_CANNOT_OFFER}"
    )


def _pss_hash_name(der: bytes, start: int, end: int) -> str:
    """The hash named by RSASSA-PSS-params (RFC 4055 section 3.1).

    RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] HashAlgorithm DEFAULT sha1, ... };
    absent parameters mean every default, so SHA-1, which becomes SHA-256.
    """
    if start == end:
        return "sha1"
    tag, seq_start, seq_end = _element(der, start, end)
    if tag != _SEQUENCE or seq_end != end:
        raise ChannelBindingError("malformed certificate: RSASSA-PSS parameters not a SEQUENCE")
    if seq_start == seq_end:
        return "sha1"
    tag, inner_start, inner_end = _element(der, seq_start, seq_end)
    if tag != _CONTEXT_0:
        return "sha1"  # hashAlgorithm omitted: its DEFAULT
    tag, alg_start, alg_end = _element(der, inner_start, inner_end)
    if tag != _SEQUENCE or alg_end != inner_end:
        raise ChannelBindingError("malformed certificate: RSASSA-PSS hashAlgorithm")
    oid, _ = _algorithm_oid(der, alg_start, alg_end)
    name = _HASH_OIDS.get(oid)
    if name is None:
        raise ChannelBindingError(
            f"certificate RSASSA-PSS hash {oid} is not supported for tls-server-end-point; "
            f"{_CANNOT_OFFER}"
        )
    return name


def _algorithm_oid(der: bytes, start: int, end: int) -> tuple[str, int]:
    """(dotted OID, where the parameters start) of the AlgorithmIdentifier in [start, end)."""
    tag, oid_start, oid_end = _element(der, start, end)
    if tag != _OID:
        raise ChannelBindingError("malformed certificate: AlgorithmIdentifier without an OID")
    return _decode_oid(der[oid_start:oid_end]), oid_end


def _element(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `pos`, inside [pos, end).

    X.690 section 8.1: one identifier octet (every tag read here is below 31), then the
    length, short form (< 0x80) or long form (0x80 | count, then count big-endian octets).
    DER forbids the indefinite form (0x80 alone).
    """
    if end - pos < 2:
        raise ChannelBindingError("malformed certificate: truncated DER")
    tag = der[pos]
    if tag & 0x1F == 0x1F:
        raise ChannelBindingError("malformed certificate: unexpected multi-byte DER tag")
    first = der[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        # A certificate is far below 4 GiB; more length octets, or none, is not DER.
        if count == 0 or count > 4 or end - pos < count:
            raise ChannelBindingError("malformed certificate: bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if end - pos < length:
        raise ChannelBindingError("malformed certificate: DER length past the end")
    return tag, pos, pos + length


def _decode_oid(content: bytes) -> str:
    """Dotted text of an OBJECT IDENTIFIER's content octets (X.690 section 8.19).

    Base-128 subidentifiers, high bit set on all but the last octet of each; the first
    subidentifier packs the first two arcs as 40 * X + Y.
    """
    if not content or content[-1] & 0x80:
        raise ChannelBindingError("malformed certificate: bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    at_start = True
    for octet in content:
        if at_start and octet == 0x80:
            # A leading 0x80 octet is a non-minimal encoding, which X.690 8.19.2 forbids.
            raise ChannelBindingError("malformed certificate: bad OBJECT IDENTIFIER")
        value = (value << 7) | (octet & 0x7F)
        at_start = not octet & 0x80
        if at_start:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [first // 40, first % 40] if first < 80 else [2, first - 80]
    return ".".join(str(arc) for arc in head + arcs[1:])
