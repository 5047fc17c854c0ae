"""The Socket.IO load generator's protocol pieces (bench/sioload.py), checked against
the RFC 6455 framing rules and the C load generator's choice of source addresses."""

from __future__ import annotations

import struct

import pytest

from bench.sioload import ProtocolError, engineio_packets, open_sid, source_address, ws_frame


@pytest.mark.parametrize(("size", "header"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_ws_frame_is_a_masked_final_text_frame(size: int, header: int) -> None:
    text = b"x" * size
    frame = ws_frame(text)
    assert frame[0] == 0x81  # FIN, text
    assert frame[1] & 0x80  # masked, as a client must
    length = frame[1] & 0x7F
    if header == 4:
        assert length == 126
        (length,) = struct.unpack("!H", frame[2:4])
    elif header == 10:
        assert length == 127
        (length,) = struct.unpack("!Q", frame[2:10])
    assert length == size
    assert frame[header : header + 4] == b"\0\0\0\0"  # the key: payload unchanged by masking
    assert frame[header + 4 :] == text


def test_source_addresses_skip_network_and_broadcast_bytes() -> None:
    assert source_address(0) == "127.77.0.2"
    assert source_address(252) == "127.77.0.254"
    assert source_address(253) == "127.77.1.1"  # .255 and .0 skipped, as loadgen.c does
    assert source_address(254 * 100 + 252) == "127.77.100.254"
    assert len({source_address(i) for i in range(5000)}) == 5000
    with pytest.raises(ValueError):
        source_address(254 * 256)


def test_engineio_payloads_and_open_packet() -> None:
    assert engineio_packets(b'40{"sid":"a"}\x1e42["echo","x"]') == [b'40{"sid":"a"}', b'42["echo","x"]']
    assert open_sid(b'0{"sid":"abc","upgrades":["websocket"]}') == "abc"
    with pytest.raises(ProtocolError):
        open_sid(b"40")
