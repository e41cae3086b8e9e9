"""Interop with Python's `websockets`, a client nobody here wrote."""

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_echo_text_and_binary_up_to_the_limit(start_server):
    server = start_server("--echo", "--max-message-bytes", "65536")

    async def go():
        async with connect(server.url(), max_size=None) as ws:
            await ws.send("grüße 🌍")
            assert await ws.recv() == "grüße 🌍"
            for size in (0, 125, 126, 65535, 65536):
                data = bytes(i % 256 for i in range(size))
                await ws.send(data)
                assert await ws.recv() == data
            await ws.send(b"x" * 65537)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1009

    run(go())


def test_fragmented_message_is_reassembled(start_server):
    server = start_server("--echo")

    async def go():
        async with connect(server.url()) as ws:
            await ws.send(["fra", "gmen", "ted ✓"])
            assert await ws.recv() == "fragmented ✓"
            await ws.send([b"\x00" * 1000, b"\x01" * 1000])
            assert await ws.recv() == b"\x00" * 1000 + b"\x01" * 1000

    run(go())


def test_ping_pong_and_server_keepalive(start_server):
    server = start_server("--echo", "--ping-interval", "200ms", "--idle-timeout", "1s")

    async def go():
        # websockets answers the server's pings by itself, so it outlives the idle timeout.
        async with connect(server.url(), ping_interval=None) as ws:
            pong = await ws.ping(b"hi")
            await asyncio.wait_for(pong, 5)
            await asyncio.sleep(2)
            await ws.send("still open")
            assert await ws.recv() == "still open"

    run(go())


def test_no_subprotocol_is_selected_on_echo(start_server):
    server = start_server("--echo")

    async def go():
        async with connect(server.url()) as ws:
            assert ws.subprotocol is None
            assert ws.response.headers["Upgrade"].lower() == "websocket"

    run(go())


def test_origin_allow_list_and_unknown_path(start_server):
    server = start_server("--echo", "--allowed-origins", "https://app.example")

    async def go():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.url(), origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as missing:
            async with connect(server.url("/nope"), origin="https://app.example"):
                pass
        assert missing.value.response.status_code == 404
        async with connect(server.url(), origin="https://app.example") as ws:
            await ws.send("ok")
            assert await ws.recv() == "ok"

    run(go())


def test_client_close_is_echoed(start_server):
    server = start_server("--echo")

    async def go():
        ws = await connect(server.url())
        await ws.close(code=4000, reason="bye")
        assert ws.close_code == 4000
        assert ws.protocol.close_rcvd.code == 4000

    run(go())


def test_shutdown_sends_1001_and_exits_0(start_server):
    server = start_server("--echo")

    async def go():
        async with connect(server.url()) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            loop = asyncio.get_running_loop()
            status = loop.run_in_executor(None, server.terminate)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd.code == 1001
            assert await status == 0

    run(go())
