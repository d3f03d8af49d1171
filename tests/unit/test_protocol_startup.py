"""Startup packets, the options switch, whole-message framing and message codecs."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import codes, messages
from proxy.protocol.errors import ProtocolError
from proxy.protocol.reader import MessageReader
from proxy.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_options,
    parse_startup_packet,
    split_options,
)


def startup(params: dict[str, str], version: int = codes.PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


class TestStartupPacket:
    def test_startup_message(self) -> None:
        packet = parse_startup_packet(startup({"user": "app", "database": "db"}))
        assert packet == StartupMessage(3, 0, {"user": "app", "database": "db"})

    def test_matches_our_encoder(self) -> None:
        params = {"user": "u", "application_name": "x y"}
        assert parse_startup_packet(messages.startup_message(params)) == StartupMessage(
            3, 0, params
        )

    def test_minor_version(self) -> None:
        packet = parse_startup_packet(startup({"user": "u"}, (3 << 16) | 2))
        assert isinstance(packet, StartupMessage) and packet.minor == 2

    def test_ssl_gss_cancel(self) -> None:
        assert parse_startup_packet(struct.pack("!II", 8, codes.SSL_REQUEST_CODE)) == SSLRequest()
        assert (
            parse_startup_packet(struct.pack("!II", 8, codes.GSSENC_REQUEST_CODE))
            == GSSENCRequest()
        )
        assert parse_startup_packet(messages.cancel_request(7, 99)) == CancelRequest(7, 99)

    @pytest.mark.parametrize(
        "packet",
        [
            struct.pack("!I", 7) + b"abc",  # too short
            struct.pack("!II", 12, codes.SSL_REQUEST_CODE) + b"junk",
            struct.pack("!III", 12, codes.CANCEL_REQUEST_CODE, 1),  # key missing
            struct.pack("!II", 9, codes.PROTOCOL_3_0) + b"u",  # no terminator
            struct.pack("!II", 13, codes.PROTOCOL_3_0) + b"user\0",  # name without value
            struct.pack("!II", 14, codes.PROTOCOL_3_0) + b"\0extra",
            struct.pack("!II", 20000, codes.PROTOCOL_3_0),  # over the cap
        ],
    )
    def test_malformed(self, packet: bytes) -> None:
        with pytest.raises(ProtocolError):
            parse_startup_packet(packet)


class TestOptions:
    def test_split_with_escapes(self) -> None:
        assert split_options(r"-c search_path=a,\ b  -c x=1") == [
            "-c",
            "search_path=a, b",
            "-c",
            "x=1",
        ]

    def test_forms(self) -> None:
        assert parse_options("-c a=1 -cb=2 --work-mem=64MB") == {
            "a": "1",
            "b": "2",
            "work_mem": "64MB",
        }

    @pytest.mark.parametrize("text", ["-d 5", "-c", "-c novalue", "--=x", "plain"])
    def test_refused(self, text: str) -> None:
        with pytest.raises(ValueError):
            parse_options(text)


class TestMessageReader:
    def test_whole_and_bytewise(self) -> None:
        data = messages.query("select 1") + messages.SYNC
        for step in (len(data), 1):
            reader = MessageReader(1000)
            got = []
            for i in range(0, len(data), step):
                reader.feed(data[i : i + step])
                while (m := reader.next_message()) is not None:
                    got.append(m)
            assert got == [(ord("Q"), b"select 1\0"), (ord("S"), b"")]

    def test_bad_length(self) -> None:
        reader = MessageReader(100)
        reader.feed(b"p" + struct.pack("!I", 101))
        with pytest.raises(ProtocolError, match="max_packet_size"):
            reader.next_message()
        reader = MessageReader(100)
        reader.feed(b"p" + struct.pack("!I", 3))
        with pytest.raises(ProtocolError):
            reader.next_message()

    def test_startup_packet_then_rest(self) -> None:
        reader = MessageReader(100)
        reader.feed(startup({"user": "u"}) + b"p")
        packet = reader.next_startup_packet()
        assert packet is not None and parse_startup_packet(packet)
        assert reader.take_rest() == b"p"


class TestCodecs:
    def test_error_fields_round_trip(self) -> None:
        raw = messages.error_response("FATAL", "53300", "too many", "detail", "hint")
        assert raw[:1] == b"E"
        fields = messages.parse_fields(raw[5:])
        assert fields == {
            "S": "FATAL",
            "V": "FATAL",
            "C": "53300",
            "M": "too many",
            "D": "detail",
            "H": "hint",
        }
        assert messages.error_summary(fields) == "FATAL 53300: too many"

    @pytest.mark.parametrize("body", [b"", b"Mabc", b"Mabc\0"])
    def test_error_fields_malformed(self, body: bytes) -> None:
        with pytest.raises(ProtocolError):
            messages.parse_fields(body)

    def test_parameter_status(self) -> None:
        raw = messages.parameter_status("TimeZone", "UTC")
        assert messages.parse_parameter_status(raw[5:]) == ("TimeZone", "UTC")
        with pytest.raises(ProtocolError):
            messages.parse_parameter_status(b"TimeZone\0UTC")

    def test_authentication(self) -> None:
        raw = messages.authentication_sasl(["SCRAM-SHA-256"])
        code, payload = messages.parse_authentication(raw[5:])
        assert code == codes.AUTH_SASL
        assert messages.parse_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]
        with pytest.raises(ProtocolError):
            messages.parse_authentication(b"\0\0")

    def test_sasl_initial_response(self) -> None:
        raw = messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
        assert messages.parse_sasl_initial_response(raw[5:]) == ("SCRAM-SHA-256", b"n,,n=,r=abc")
        with pytest.raises(ProtocolError):
            messages.parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x09abc")

    def test_backend_key_data(self) -> None:
        raw = messages.backend_key_data(123, 456)
        assert messages.parse_backend_key_data(raw[5:]) == (123, 456)
        with pytest.raises(ProtocolError):
            messages.parse_backend_key_data(b"\0\0\0\1")
