"""The IM protocol driven by Python `websockets` and protobuf code generated from proto/
with grpcio-tools' protoc: a client written from the .proto alone."""

import asyncio
import importlib
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from websockets.asyncio.client import connect

from conftest import ROOT, SECRET

TIMEOUT = 10


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
         f"--python_out={out}", str(ROOT / "proto/imgate/v1/imgate.proto")],
        check=True,
    )
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("imgate.v1.imgate_pb2")
    finally:
        sys.path.remove(str(out))


def token(uid):
    return jwt.encode({"sub": uid, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


class Client:
    def __init__(self, pb, ws):
        self.pb, self.ws, self.next_id = pb, ws, 1

    async def request(self, **body):
        frame = self.pb.ClientFrame(id=self.next_id, **body)
        self.next_id += 1
        await self.ws.send(frame.SerializeToString())
        return frame.id

    async def recv(self):
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        assert isinstance(data, bytes)
        frame = self.pb.ServerFrame()
        frame.ParseFromString(data)
        return frame

    async def answer(self, rid):
        while True:
            f = await self.recv()
            if f.id == rid:
                return f

    async def login(self, uid, device, last_seq=0):
        rid = await self.request(login=self.pb.Login(token=token(uid), device_id=device, last_seq=last_seq))
        f = await self.answer(rid)
        assert f.WhichOneof("body") == "login_ok", f
        return f.login_ok


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_chat_between_two_users_with_acks_and_resume(start_server, pb):
    server = start_server()

    async def go():
        async with connect(server.url("/ws")) as a, connect(server.url("/ws")) as b:
            alice, bob = Client(pb, a), Client(pb, b)
            ok = await alice.login("alice", "py-phone")
            assert ok.uid == "alice" and ok.max_seq == 0
            await bob.login("bob", "py-phone")
            rid = await alice.request(send=pb.SendMessage(to_uid="bob", client_msg_id="c1", content=b"hi"))
            sent = (await alice.answer(rid)).send_ok
            assert sent.seq == 1 and not sent.duplicate
            got = await bob.recv()
            assert got.id == 0 and got.message.seq == 1
            assert got.message.from_uid == "alice" and got.message.content == b"hi"
            await bob.request(ack=pb.Ack(seq=1))
            rid = await alice.request(send=pb.SendMessage(to_uid="bob", client_msg_id="c1", content=b"hi"))
            dup = (await alice.answer(rid)).send_ok
            assert dup.seq == 1 and dup.duplicate
            rid = await alice.request(ping=pb.Ping(client_time_ms=123))
            pong = (await alice.answer(rid)).pong
            assert pong.client_time_ms == 123 and pong.server_time_ms > 0

        # Bob comes back on the same device after two more messages: only those arrive.
        async with connect(server.url("/ws")) as a:
            alice = Client(pb, a)
            await alice.login("alice", "py-phone")
            for i in (2, 3):
                rid = await alice.request(send=pb.SendMessage(to_uid="bob", client_msg_id=f"c{i}", content=b"x"))
                await alice.answer(rid)
        async with connect(server.url("/ws")) as b:
            bob = Client(pb, b)
            ok = await bob.login("bob", "py-phone")
            assert ok.max_seq == 3
            seqs = [(await bob.recv()).message.seq for _ in range(2)]
            assert seqs == [2, 3]
            rid = await bob.request(sync=pb.Sync(after_seq=0, limit=2))
            page = (await bob.answer(rid)).sync_result
            assert [m.seq for m in page.messages] == [1, 2] and page.has_more

    run(go())


def test_errors_from_a_python_client(start_server, pb):
    server = start_server("--max-content-bytes", "8")

    async def go():
        async with connect(server.url("/ws")) as w:
            c = Client(pb, w)
            rid = await c.request(sync=pb.Sync())
            err = (await c.answer(rid)).error
            assert err.code == pb.ERROR_CODE_UNAUTHENTICATED
            await c.login("zoe", "py")
            rid = await c.request(send=pb.SendMessage(to_uid="yann", client_msg_id="big", content=b"123456789"))
            assert (await c.answer(rid)).error.code == pb.ERROR_CODE_TOO_LARGE
            await w.send(b"\xff\xff")
            f = await c.recv()
            assert f.error.code == pb.ERROR_CODE_BAD_REQUEST
        async with connect(server.url("/ws")) as w:
            c = Client(pb, w)
            rid = await c.request(login=pb.Login(token="nope", device_id="d"))
            assert (await c.answer(rid)).error.code == pb.ERROR_CODE_UNAUTHENTICATED
            with pytest.raises(Exception) as closed:
                await asyncio.wait_for(w.recv(), TIMEOUT)
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1008

    run(go())
