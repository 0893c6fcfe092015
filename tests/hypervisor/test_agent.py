"""The guest agent as a real process on the host, serving a unix socket (``--listen``), driven by the real client.

The same binary runs in the guests (tests/hypervisor/test_image.py boots one); here its protocol, exec, files and
resilience are exercised without a VM. Ops that change the machine (time, entropy, network, power) are disabled
without ``--system``, which these tests never pass: the agent runs on the test machine itself.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor._errors import AgentError, AgentProtocolError, AgentTimeout
from hypervisor.agent import (
    MAX_FRAME,
    AgentClient,
    Frame,
    FrameDecoder,
    encode_frame,
)
from hypervisor.image import build_agent

FRAME_TIMEOUT_MS = 300  # the agent drops a frame that stops arriving for this long ("truncated")


@pytest.fixture(scope="session")
def agent_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_agent(tmp_path_factory.mktemp("agent") / "cube-agent", build_id="test")


class Agent:
    def __init__(self, binary: Path, sock: Path) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [str(binary), "--listen", str(sock), "--frame-timeout-ms", str(FRAME_TIMEOUT_MS)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def client(self, **kw: float) -> AgentClient:
        return AgentClient.connect(self.sock, timeout=10, **kw)

    def raw(self) -> socket.socket:
        """A plain connection for hand-made frames (the agent serves one connection at a time)."""
        AgentClient.connect(self.sock, timeout=10).close()  # wait until it listens
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.sock))
        return s

    def stop(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err.decode(errors="replace")


@pytest.fixture
def agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_binary, tmp_path / "agent.sock")
    try:
        yield a
    finally:
        a.stop()


def read_frame(s: socket.socket, decoder: FrameDecoder) -> Frame:
    while True:
        data = s.recv(1 << 16)
        assert data, "the agent closed the connection"
        frames = decoder.feed(data)
        if frames:
            assert len(frames) == 1, frames
            return frames[0]


def read_frame_and_reply(s: socket.socket, rid: int) -> Frame:
    s.sendall(hello_frame(rid))
    return read_frame(s, FrameDecoder())


def hello_frame(rid: int) -> bytes:
    return encode_frame({"id": rid, "op": "hello"})


# -- ops ---------------------------------------------------------------------------------------------------------


def test_hello(agent: Agent) -> None:
    with agent.client() as c:
        h = c.hello()
    assert h.protocol == 1
    assert h.agent == "cube-egress-agent/test"
    assert h.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert h.kernel == os.uname().release
    assert h.system is False
    assert {"hello", "exec", "read_file", "write_file", "set_time", "reseed", "net_config", "shutdown"} <= set(h.ops)


def test_exec_exit_code_and_binary_streams(agent: Agent) -> None:
    with agent.client() as c:
        r = c.exec(["sh", "-c", r"printf 'a\000b\377'; printf 'e\000\001' >&2; exit 3"])
    assert (r.exit_code, r.signal, r.timed_out) == (3, None, False)
    assert r.stdout == b"a\x00b\xff"
    assert r.stderr == b"e\x00\x01"
    assert not r.ok


def test_exec_argv_is_not_a_shell_line(agent: Agent, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with agent.client() as c:
        r = c.exec(["echo", f"$(touch {marker}); `touch {marker}`", "a b", "'\""])
    assert r.stdout == f"$(touch {marker}); `touch {marker}` a b '\"\n".encode()
    assert not marker.exists()


def test_exec_env_cwd_and_path_search(agent: Agent, tmp_path: Path) -> None:
    with agent.client() as c:
        r = c.exec(["sh", "-c", 'echo "$CXA_TEST|$PWD"; command -v sh'], env={"CXA_TEST": "x y"}, cwd=str(tmp_path))
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"x y|{tmp_path}"
    assert lines[1].endswith("/sh")


def test_exec_large_stdin_stdout_and_stderr_at_once(agent: Agent) -> None:
    # cat echoes 3 MiB while the agent is still writing stdin, and 2 MiB go to stderr: if the agent wrote stdin
    # blocking, or read one pipe at a time, this would deadlock (the test would time out).
    data = os.urandom(3 << 20)
    with agent.client() as c:
        r = c.exec(["sh", "-c", "cat; head -c 2097152 /dev/zero >&2"], stdin=data, timeout_s=60)
    assert r.exit_code == 0
    assert r.stdout == data
    assert r.stderr == b"\x00" * (2 << 20)
    assert not r.stdout_truncated and not r.stderr_truncated


def test_exec_output_beyond_the_cap_is_truncated_not_fatal(agent: Agent) -> None:
    with agent.client() as c:
        r = c.exec(["head", "-c", str(20 << 20), "/dev/zero"], timeout_s=60)
        assert r.exit_code == 0
        assert r.stdout_truncated
        assert len(r.stdout) == 16 << 20
        assert c.exec(["true"]).ok  # still serving


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_exec_timeout_kills_the_process_group(agent: Agent) -> None:
    with agent.client() as c:
        r = c.exec(["sh", "-c", "sleep 1000 & echo $!; sleep 1000 & echo $!; exec sleep 1000"], timeout_s=0.5)
        assert r.timed_out
        assert r.exit_code is None
        assert r.signal == 9
        children = [int(x) for x in r.stdout.split()]
        assert len(children) == 2
        assert not any(_alive(pid) for pid in children)
        # the agent serves on, and a process that closes its output early still times out
        r = c.exec(["sh", "-c", "exec >&- 2>&-; sleep 1000"], timeout_s=0.5)
        assert r.timed_out and r.signal == 9


def test_exec_errors(agent: Agent, tmp_path: Path) -> None:
    with agent.client() as c:
        with pytest.raises(AgentError) as e:
            c.exec(["cube-egress-no-such-command"])
        assert e.value.code == "ENOENT"
        assert e.value.op == "exec"
        with pytest.raises(AgentError) as e:
            c.exec(["true"], cwd=str(tmp_path / "missing"))
        assert e.value.code == "ENOENT"
        with pytest.raises(AgentError) as e:
            c.call("exec", {"argv": []})
        assert e.value.code == "bad_request"
        with pytest.raises(AgentError) as e:
            c.call("exec", {"argv": ["true"], "env": {"A=B": "x"}})
        assert e.value.code == "bad_request"
        assert c.exec(["true"]).ok


def test_file_round_trip(agent: Agent, tmp_path: Path) -> None:
    data = os.urandom(1 << 20) + b"\x00\n\r\xff"
    target = tmp_path / "dir" / "blob.bin"
    target.parent.mkdir()
    with agent.client() as c:
        c.write_file(str(target), data, mode=0o600)
        got, mode = c.read_file_and_mode(str(target))
        assert got == data
        assert mode == 0o600
        assert target.read_bytes() == data  # the agent runs on this machine: the file is real
        assert os.listdir(target.parent) == ["blob.bin"]  # the temporary file was renamed, not left behind
        c.write_file(str(target), b"")  # replaced atomically, even by nothing
        assert c.read_file(str(target)) == b""
        assert target.stat().st_mode & 0o7777 == 0o644
        for path, code in [(tmp_path / "missing", "ENOENT"), (tmp_path, "EISDIR")]:
            with pytest.raises(AgentError) as e:
                c.read_file(str(path))
            assert e.value.code == code
        with pytest.raises(AgentError) as e:
            c.write_file(str(tmp_path / "missing" / "x"), b"x")
        assert e.value.code == "ENOENT"
        with pytest.raises(AgentError) as e:
            c.read_file("relative/path")
        assert e.value.code == "bad_request"


def test_machine_changing_ops_need_system_mode(agent: Agent) -> None:
    # The agent under test runs on the test machine: these must be refused, or this test would power it off.
    for op in ("set_time", "reseed", "net_config", "shutdown"):
        with agent.client() as c:
            with pytest.raises(AgentError) as e:
                if op == "set_time":
                    c.set_time()
                elif op == "reseed":
                    c.reseed()
                elif op == "net_config":
                    c.net_config("10.9.9.9/24", gateway="10.9.9.1", dns=["10.9.9.1"])
                else:
                    c.shutdown()
            assert (e.value.op, e.value.code) == (op, "disabled")
    with agent.client() as c:
        assert c.hello().system is False


NET_CONFIG_BAD: dict[str, dict[str, object]] = {
    "no_address": {"interface": "eth0"},
    "address_without_prefix": {"address": "10.9.9.9"},
    "prefix_too_long": {"address": "10.9.9.9/33"},
    "prefix_with_sign": {"address": "10.9.9.9/+8"},
    "prefix_of_three_digits": {"address": "10.9.9.9/008"},
    "ipv6_address": {"address": "2001:db8::1/64"},
    "address_not_a_string": {"address": 167772160},
    "interface_too_long": {"address": "10.9.9.9/24", "interface": "x" * 16},
    "interface_with_slash": {"address": "10.9.9.9/24", "interface": "../eth0"},
    "interface_like_an_option": {"address": "10.9.9.9/24", "interface": "-eth0"},
    "mac_too_short": {"address": "10.9.9.9/24", "mac": "52:54:00:12:34"},
    "mac_with_spaces": {"address": "10.9.9.9/24", "mac": "52:54:00:12:34: 6"},
    "mac_not_hex": {"address": "10.9.9.9/24", "mac": "52:54:00:12:34:zz"},
    "mac_wrong_separator": {"address": "10.9.9.9/24", "mac": "52-54-00-12-34-56"},
    "gateway_not_ipv4": {"address": "10.9.9.9/24", "gateway": "10.9.9"},
    "dns_not_a_list": {"address": "10.9.9.9/24", "dns": "10.9.9.1"},
    "dns_entry_not_ipv4": {"address": "10.9.9.9/24", "dns": ["10.9.9.1", "resolver"]},
    "dns_too_many": {"address": "10.9.9.9/24", "dns": [f"10.9.9.{i}" for i in range(9)]},
}


@pytest.mark.parametrize("case", sorted(NET_CONFIG_BAD))
def test_net_config_rejects_bad_fields_before_the_system_gate(agent: Agent, case: str) -> None:
    # Raw fields (the client would refuse most of these itself): the agent checks every field first, so a bad
    # request says what is wrong even where the op is disabled, and never touches the test machine's network.
    with agent.client() as c, pytest.raises(AgentError) as e:
        c.call("net_config", NET_CONFIG_BAD[case])
    assert (e.value.op, e.value.code) == ("net_config", "bad_request"), e.value.detail


def test_net_config_with_good_fields_is_still_disabled_without_system(agent: Agent) -> None:
    fields = {"address": "10.9.9.9/24", "interface": "eth0", "mac": "52:54:00:AB:cd:EF", "gateway": "10.9.9.1",
              "dns": ["10.9.9.1", "10.9.9.2"]}  # fmt: skip
    with agent.client() as c, pytest.raises(AgentError) as e:
        c.call("net_config", fields)
    assert e.value.code == "disabled"


# -- malformed input -----------------------------------------------------------------------------------------------


def _prefix(version: int, length: int) -> bytes:
    return struct.pack(">3sBI", b"CXA", version, length)


def _payload(text: bytes) -> bytes:
    return _prefix(1, len(text)) + text


MALFORMED = {
    "bad_magic": (b"GARBAGE!" * 3, None, "bad_magic"),
    "bad_magic_then_partial_magic": (b"xxCXxC", None, "bad_magic"),
    "bad_version": (_prefix(2, 5) + b"hello", None, "bad_version"),
    "too_large": (_prefix(1, MAX_FRAME + 1), None, "too_large"),
    "truncated": (_prefix(1, 100) + b'{"id":1', None, "truncated"),
    "empty_payload": (_prefix(1, 0), None, "bad_frame"),
    "no_header_line": (_payload(b'{"id":1,"op":"hello"}'), None, "bad_frame"),
    "bad_json": (_payload(b'{"id":1,"op":hello}\n'), None, "bad_json"),
    "duplicate_key": (_payload(b'{"id":1,"id":2,"op":"hello"}\n'), None, "bad_json"),
    "not_an_object": (_payload(b"[1,2]\n"), None, "bad_request"),
    "no_id": (_payload(b'{"op":"hello"}\n'), None, "bad_request"),
    "blobs_do_not_add_up": (_payload(b'{"id":5,"op":"hello","blobs":[10]}\nabc'), 5, "bad_frame"),
    "unknown_op": (_payload(b'{"id":6,"op":"frobnicate"}\n'), 6, "unknown_op"),
    "no_op": (_payload(b'{"id":8}\n'), 8, "bad_request"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frame_gets_an_error_and_the_next_request_works(agent: Agent, case: str) -> None:
    data, want_id, want_code = MALFORMED[case]
    decoder = FrameDecoder()
    with agent.raw() as s:
        s.sendall(data)
        err = read_frame(s, decoder)
        assert err.header["ok"] is False
        assert err.header["id"] == want_id
        assert err.header["error"] == want_code, err.header
        assert isinstance(err.header["detail"], str) and err.header["detail"]
        s.sendall(hello_frame(99))
        reply = read_frame(s, decoder)
        assert reply.header["id"] == 99
        assert reply.header["ok"] is True


def test_a_burst_of_garbage_gets_one_error(agent: Agent) -> None:
    decoder = FrameDecoder()
    with agent.raw() as s:
        s.sendall(os.urandom(4096).replace(b"C", b"c") + hello_frame(7))
        frames: list[Frame] = []
        while not any(f.header.get("id") == 7 for f in frames):
            frames += decoder.feed(s.recv(1 << 16))
    assert [f.header.get("error") for f in frames] == ["bad_magic", None]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Ops that cannot act on the test machine: exec and write_file are left out on purpose (random argv/paths as root),
# and the machine-changing ones must be refused whatever their fields say.
_headers = st.fixed_dictionaries(
    {"op": st.sampled_from(["hello", "read_file", "reseed", "set_time", "net_config", "shutdown", "nope", ""])},
    optional={
        "id": st.one_of(st.integers(-5, 2**64), _json),
        "path": st.one_of(st.text(max_size=30).map(lambda t: "/" + t), _json),
        "blobs": st.lists(st.integers(-3, 100), max_size=5) | _json,
        "epoch_ns": _json,
        "address": _json,
        "dns": _json,
    },
)


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    # stdlib json: it writes integers of any size (orjson stops at 64 bits), and so may a hostile host
    body = json.dumps(draw(_headers), ensure_ascii=draw(st.booleans())).encode() + b"\n" + draw(st.binary(max_size=40))
    length = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 8)))
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    return struct.pack(">3sBI", b"CXA", version, length) + body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=24) | st.just(b"CXA") | st.just(b"CXA\x01") | _frames(), max_size=6))
def test_fuzzed_input_gets_well_formed_answers_and_never_kills_the_agent(agent: Agent, chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    with agent.raw() as s:
        s.sendall(b"".join(chunks) + hello_frame(4242))
        s.shutdown(socket.SHUT_WR)  # the agent reads all of it, answers, then sees EOF and drops the connection
        while data := s.recv(1 << 16):
            frames += decoder.feed(data)  # raises if the agent ever sent a malformed frame
    for f in frames:
        assert isinstance(f.header["ok"], bool)
        if f.header["ok"]:
            assert f.header["id"] == 4242 or "protocol" in f.header or "mode" in f.header
        else:
            assert isinstance(f.header["error"], str) and isinstance(f.header["detail"], str)
            assert f.header["error"] != "internal"
    assert agent.proc.poll() is None
    with agent.client() as c:
        assert c.hello().system is False


# -- the host going away ---------------------------------------------------------------------------------------------


def test_reconnect_after_disconnects(agent: Agent) -> None:
    with agent.client() as c:
        boot = c.hello().boot_id
    # half a frame, then gone; a host that goes away in the middle of a 16 MiB reply: each time the next
    # connection starts clean, its first frame is the answer to its own first request
    with agent.raw() as s:
        s.sendall(hello_frame(1)[:10])
    with agent.raw() as s:
        first = read_frame_and_reply(s, 3)
    assert (first.header["id"], first.header["ok"]) == (3, True)
    with agent.raw() as s:
        s.sendall(encode_frame({"id": 4, "op": "exec", "argv": ["head", "-c", str(16 << 20), "/dev/zero"]}))
        assert s.recv(8)[:3] == b"CXA"
    with agent.raw() as s:
        first = read_frame_and_reply(s, 5)
    assert (first.header["id"], first.header["ok"]) == (5, True)
    for _ in range(3):
        with agent.client() as c:
            assert c.hello().boot_id == boot
            assert c.exec(["echo", "still here"]).stdout == b"still here\n"
    assert agent.proc.poll() is None


def test_connect_waits_for_the_agent(agent_binary: Path, tmp_path: Path) -> None:
    sock = tmp_path / "late.sock"
    started: list[Agent] = []
    timer = threading.Timer(0.3, lambda: started.append(Agent(agent_binary, sock)))
    timer.start()
    try:
        with AgentClient.connect(sock, timeout=20) as c:
            assert c.hello().protocol == 1
    finally:
        timer.join()
        for a in started:
            a.stop()


def test_connect_times_out_without_an_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentTimeout) as e:
        AgentClient.connect(tmp_path / "nobody.sock", timeout=0.3)
    assert e.value.op == "connect"


def test_call_deadline_closes_the_client(agent: Agent) -> None:
    c = agent.client()
    with pytest.raises(AgentTimeout):
        c.call("exec", {"argv": ["sleep", "1000"], "timeout_s": 1}, timeout=0.2)
    assert c.closed
    with pytest.raises(AgentProtocolError):
        c.hello()
    # the agent finishes (kills) that command at its own deadline, then serves the next connection
    with agent.client() as c2:
        assert c2.hello().protocol == 1


# -- a hostile guest: the client bounds and checks what it reads -------------------------------------------------------


def _fake_agent(tmp_path: Path, reply: bytes) -> tuple[Path, threading.Thread]:
    """A socket that answers the first request with ``reply`` (what a compromised guest could send)."""
    path = tmp_path / "hostile.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(1 << 16)
            conn.sendall(reply)
            conn.recv(1 << 16)  # hold the connection until the client gives up

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return path, t


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (_prefix(1, MAX_FRAME + 1), "too_large"),
        (_prefix(9, 3) + b"{}\n", "bad_version"),
        (_payload(b"not json\n"), "bad_json"),
        (_payload(b'{"id":1,"ok":true,"blobs":[100]}\nshort'), "bad_frame"),
        (_payload(b'{"id":1,"ok":"yes"}\n'), "bad_reply"),
        (_payload(b'{"id":1,"ok":true,"protocol":true}\n'), "bad_reply"),
    ],
)
def test_client_rejects_hostile_replies(tmp_path: Path, reply: bytes, code: str) -> None:
    path, t = _fake_agent(tmp_path, reply)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    c = AgentClient(s, call_timeout=10)
    with pytest.raises(AgentProtocolError) as e:
        c.hello()
    assert e.value.code == code
    c.close()
    t.join(10)


def test_decoder_skips_garbage_and_splits_frames() -> None:
    d = FrameDecoder()
    stream = b"junkC" + encode_frame({"id": 1}, [b"a\x00", b""]) + b"CX" + encode_frame({"id": 2}, [b"z" * 70000])
    frames: list[Frame] = []
    for i in range(0, len(stream), 7):  # byte-wise feeding across every boundary
        frames += d.feed(stream[i : i + 7])
    assert [f.header["id"] for f in frames] == [1, 2]
    assert frames[0].blobs == [b"a\x00", b""]
    assert frames[1].blobs == [b"z" * 70000]
    assert d.skipped == len(b"junkC") + len(b"CX")
    assert d.pending == 0
    with pytest.raises(ValueError):
        encode_frame({"id": 3}, [b"\0" * MAX_FRAME])
