"""ovmf-mh export / import / send / receive: move guest memory through helpers."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, cast

from host_shim import paths
from host_shim.commands.options import add_mailbox_timeout
from host_shim.errors import OvmfMhError, SetupError
from host_shim.helpers.backends import KINDS
from host_shim.helpers.keys import read_key
from host_shim.local_files import create_exclusive
from host_shim.transfer import commit_proof
from host_shim.transfer.container import FileHeader
from host_shim.transfer.liveness import Liveness, LiveSocketIO, StreamStalled
from host_shim.transfer.pipeline import (
    Nonces,
    TransferSummary,
    encode_challenge,
    export_ram,
    import_ram,
    partial_summary,
    read_challenge,
)
from host_shim.vm import process

VERDICT_LIMIT = 65536
#: Seconds without progress on the connection before either end gives up: a
#: peer that hangs (rather than closing) must not hang this end forever.
IDLE_TIMEOUT = 120.0


def _common(parser: argparse.ArgumentParser, direction: str) -> None:
    parser.add_argument("--key", type=Path, required=True, help="transport key file (ovmf-mh keygen)")
    parser.add_argument(
        "--helper", choices=KINDS, default="firmware",
        help="helper implementation: firmware (default; helper VMs of the image 'ovmf-mh build' made, "
        "never a silent fallback), reference (the Python reference helper, one process per shard) "
        "or host-core (the firmware's C dispatcher built for the host, in-process)",
    )
    parser.add_argument("--image", type=Path,
                        help="firmware image of --helper firmware (default: the DEBUG build); refused with "
                        "the other helper kinds, which run no firmware")
    parser.add_argument("--work-dir", type=Path,
                        help="folder for the helpers' logs (default: a new temp folder, removed unless the "
                        "command fails)")
    add_mailbox_timeout(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout (default: text)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress line on stderr (default: when stderr is a terminal)")
    if direction == "export":
        parser.add_argument("--helpers", type=int, default=1,
                            help="helpers in parallel, one shard each, 1 to 64 (default 1)")
        parser.add_argument("--page-map", type=Path,
                            help="one byte per guest page: 0 private (helpers), 1 shared (plain), 2 excluded "
                            "(default: every page private)")
        parser.add_argument("--zero-ranges", action=argparse.BooleanOptionalAction, default=True,
                            help="send the pages in holes of the sparse RAM file (never written) as zero "
                            "ranges, one authenticated record per run that the source helper checks is all "
                            "zero (ABI 2.1; default on); --no-zero-ranges sends every page as its own record, "
                            "as a 2.0 target needs")
    else:
        parser.add_argument("--helpers", type=int, help="must equal the stream's shard count (default: that)")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    export = sub.add_parser(
        "export", help="guest RAM file -> transfer stream file, through source helpers",
        description="Read the guest RAM file --ram through source helpers and write the encrypted transfer "
        "stream (docs/transfer-format.md) to --out. The stream is written to a hidden temporary name next "
        "to --out and renamed only when complete.",
    )
    export.add_argument("--ram", type=Path, required=True, help="guest RAM file (memory-backend-file)")
    export.add_argument("--out", type=Path, required=True, help="transfer stream to write")
    export.add_argument("--challenge", type=Path,
                        help="challenge file of the importing side ('ovmf-mh import --challenge-out'): bind the "
                        "streams to its target helpers so that only that import accepts them (default: none, "
                        "an unbound stream that any import without a challenge accepts, also replayed)")
    _common(export, "export")
    export.set_defaults(handler=run_export)

    imp = sub.add_parser(
        "import", help="transfer stream file -> guest RAM file, through target helpers",
        description="Write the pages of the transfer stream --in into the guest RAM file --ram through target "
        "helpers. Exit 0 only after every helper verified its end-of-stream proof. Pages land in a hidden "
        "temporary file next to --ram that is renamed over it only after full verification; on failure "
        "--ram is left untouched.",
    )
    imp.add_argument("--ram", type=Path, required=True, help="guest RAM file to create or replace")
    imp.add_argument("--in", dest="stream", type=Path, required=True, help="transfer stream to read")
    imp.add_argument("--challenge-out", type=Path,
                     help="start the target helpers first, write their challenge to this file (for 'ovmf-mh "
                     "export --challenge'), then wait for --in to appear and accept only streams bound to "
                     "these helpers; needs --helpers and --guest-size (default: no challenge; unbound "
                     "streams are accepted)")
    imp.add_argument("--guest-size", type=int,
                     help="guest RAM bytes, with --challenge-out (default: none; the stream says)")
    imp.add_argument("--wait", type=float, default=600.0,
                     help="with --challenge-out, seconds to wait for --in to appear (default 600)")
    _common(imp, "import")
    imp.set_defaults(handler=run_import)

    send = sub.add_parser(
        "send", help="guest RAM file -> TCP, through source helpers",
        description="Like export, but streams the guest RAM file --ram to a receiver at --to HOST:PORT "
        "(TCP back pressure) and exits 0 only when the receiver reports a verified import.",
    )
    send.add_argument("--ram", type=Path, required=True, help="guest RAM file to send (memory-backend-file)")
    send.add_argument("--to", required=True, metavar="HOST:PORT",
                      help="the receiver's address ('ovmf-mh receive --listen' prints it)")
    send.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to connect (default 30)")
    send.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                      help="give up when the receiver takes no data, or sends no verdict, for this many "
                      f"seconds (default {IDLE_TIMEOUT:.0f})")
    _common(send, "export")
    send.set_defaults(handler=run_send)

    receive = sub.add_parser(
        "receive", help="TCP -> guest RAM file, through target helpers",
        description="Accept one sender on --listen HOST:PORT, import its stream into the guest RAM file "
        "--ram like 'import', then tell the sender the outcome.",
    )
    receive.add_argument("--ram", type=Path, required=True, help="guest RAM file to create or replace")
    receive.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="address to listen on; port 0 picks a free port, printed on stderr")
    receive.add_argument("--accept-timeout", type=float, default=300.0,
                         help="seconds to wait for the sender to connect (default 300)")
    receive.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT,
                         help="give up when the sender makes no progress (no frame that carries pages: KEEPALIVE "
                         "frames and trickling bytes do not count) for this many seconds of waiting "
                         f"(default {IDLE_TIMEOUT:.0f})")
    _common(receive, "import")
    receive.set_defaults(handler=run_receive)


def _work_dir(args: argparse.Namespace, label: str) -> Path:
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(args.work_dir).resolve()
    else:
        # Removed by the reaper if the command dies; kept on a failure it reports.
        work = process.temp_dir(f"ovmf-mh-{label}-")
    args.resolved_work_dir = work
    return work


def _helper_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"kind": args.helper, "helpers": args.helpers, "firmware": _firmware(args),
            "progress": args.progress, "mailbox_timeout": args.mailbox_timeout}


def _firmware(args: argparse.Namespace) -> Path | None:
    if args.helper != "firmware":
        if args.image is not None:
            # Refused rather than ignored: the user meant some firmware to run.
            raise SetupError(f"--image {args.image} applies to --helper firmware only; "
                             f"--helper {args.helper} runs no firmware")
        return None
    return (args.image or paths.firmware_code("DEBUG")).resolve()


def _report(args: argparse.Namespace, summary: TransferSummary | None, error: OvmfMhError | None,
            direction: str, cause: BaseException | None = None) -> int:
    """Print the summary (what was really done, also on failure) and pick the exit code."""
    work = getattr(args, "resolved_work_dir", None)
    if args.work_dir is None and work is not None:
        if error is None:
            process.remove(work)  # a temporary work folder only matters when something failed
        else:
            process.keep(work)  # the report names it: the helpers' logs say what happened
    for failed in (error, cause):
        if summary is None and failed is not None:
            summary = partial_summary(failed)
    if summary is None:
        summary = TransferSummary(direction, args.helper, args.helpers or 0, 0, error=str(error),
                                  work_dir=str(work) if work else None)
    elif error is not None:
        summary.error = str(error)  # the command's own words beat the low-level cause
    summary.direction = direction
    if error is not None:
        summary.outcome = "failed"
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print(summary.describe(), file=sys.stderr if error else sys.stdout)
    return 0 if error is None else 1


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise OvmfMhError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _file_challenge(args: argparse.Namespace) -> Nonces | None:
    """The nonces of --challenge, checked against --helpers and --ram."""
    if args.challenge is None:
        return None
    try:
        with args.challenge.open("rb") as f:
            nonces, guest_size = read_challenge(f)
            if f.read(1):
                raise OvmfMhError(f"the challenge {args.challenge} has bytes after its last nonce")
    except OSError as exc:
        raise OvmfMhError(f"cannot read the challenge {args.challenge}: {exc.strerror or exc}") from None
    if len(nonces) != args.helpers:
        raise OvmfMhError(f"the challenge {args.challenge} is for {len(nonces)} helper(s); give --helpers "
                          f"{len(nonces)} (got {args.helpers})")
    size = args.ram.stat().st_size if args.ram.is_file() else None
    if size != guest_size:
        raise OvmfMhError(f"the challenge {args.challenge} is for a {guest_size}-byte guest; {args.ram} has "
                          f"{size} bytes")
    return nonces


def run_export(args: argparse.Namespace) -> int:
    _firmware(args)  # first: a refused --image leaves nothing behind
    key = read_key(args.key)
    if _same_file(args.ram, args.out):
        raise OvmfMhError(f"--out {args.out} is the guest RAM file itself; the stream would replace it")
    nonces = _file_challenge(args)
    work = _work_dir(args, "export")
    partial = args.out.with_name(f".{args.out.name}.partial")
    summary: TransferSummary | None = None
    try:
        # Never through a link planted at the partial name (local_files.py).
        descriptor = create_exclusive(partial)
    except OSError as exc:
        return _report(args, None, OvmfMhError(f"cannot write {args.out}: {exc.strerror or exc} (creating {partial})"),
                       "export")
    except OvmfMhError as exc:
        return _report(args, None, exc, "export")
    process.remove_on_exit(partial)  # even if the export is killed
    try:
        with os.fdopen(descriptor, "wb") as sink:
            summary = export_ram(args.ram, key, sink, work_dir=work, page_map=args.page_map,
                                 challenge=None if nonces is None else lambda: nonces,
                                 zero_ranges=args.zero_ranges, **_helper_options(args))
            os.fsync(sink.fileno())
        os.replace(partial, args.out)
        process.keep(partial)
    except OvmfMhError as exc:
        partial.unlink(missing_ok=True)
        return _report(args, summary, exc, "export")
    except OSError as exc:  # disk full, no permission, a directory that is not there...
        partial.unlink(missing_ok=True)
        where = args.out if exc.filename in (None, str(partial)) else exc.filename
        return _report(args, summary, OvmfMhError(f"cannot write {where}: {exc.strerror or exc}"), "export", exc)
    except BaseException:  # Ctrl-C: the helpers are stopped on the way out; no half stream stays
        partial.unlink(missing_ok=True)
        raise
    return _report(args, summary, None, "export")


class _AppearingFile:
    """A file read from its first byte once it exists: export renames its
    output into place only when complete."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path, self.wait = path, wait
        self._file: IO[bytes] | None = None

    def read(self, size: int = -1) -> bytes:
        if self._file is None:
            deadline = time.monotonic() + self.wait
            while not self.path.exists():
                if time.monotonic() > deadline:
                    raise OvmfMhError(f"{self.path} did not appear within {self.wait:g} s (--wait)")
                time.sleep(0.1)
            self._file = self.path.open("rb")
        return self._file.read(size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _write_challenge(path: Path, nonces: Nonces, guest_size: int) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with os.fdopen(create_exclusive(partial), "wb") as out:
        out.write(encode_challenge(nonces, guest_size))
    os.replace(partial, path)


def run_import(args: argparse.Namespace) -> int:
    _firmware(args)  # first: a refused --image leaves nothing behind
    key = read_key(args.key)
    if _same_file(args.ram, args.stream):
        raise OvmfMhError(f"--ram {args.ram} is the stream itself; the guest RAM would replace it")
    if args.challenge_out is not None and (args.helpers is None or args.guest_size is None):
        raise OvmfMhError("--challenge-out starts the target helpers before the stream exists: give --helpers "
                          "and --guest-size")
    if args.challenge_out is None and args.guest_size is not None:
        raise OvmfMhError("--guest-size applies to --challenge-out only; without it the stream says")
    work = _work_dir(args, "import")
    try:
        if args.challenge_out is not None:
            source = _AppearingFile(args.stream, args.wait)
            try:
                summary = import_ram(
                    args.ram, key, cast(IO[bytes], source), work_dir=work,
                    expect=FileHeader(args.guest_size, args.helpers),
                    challenge=lambda nonces, size: _write_challenge(args.challenge_out, nonces, size),
                    **_helper_options(args))
            finally:
                source.close()
        else:
            with args.stream.open("rb") as opened:
                summary = import_ram(args.ram, key, opened, work_dir=work, **_helper_options(args))
    except OSError as exc:
        return _report(args, None, OvmfMhError(f"cannot read {args.stream}: {exc.strerror}"), "import")
    except OvmfMhError as exc:
        return _report(args, None, exc, "import")
    return _report(args, summary, None, "import")


def run_send(args: argparse.Namespace) -> int:
    _firmware(args)  # first: a refused --image leaves nothing behind
    key = read_key(args.key)
    work = _work_dir(args, "send")
    summary: TransferSummary | None = None
    try:
        sock = socket.create_connection(_address(args.to), timeout=args.connect_timeout)
    except OSError as exc:
        return _report(args, None, OvmfMhError(
            f"cannot connect to the receiver at {args.to}: {exc.strerror or exc}; is 'ovmf-mh receive' "
            "listening there?"), "send")
    try:
        with sock:
            sock.settimeout(args.idle_timeout)
            sink = cast(IO[bytes], sock.makefile("wb", buffering=1024 * 1024))
            try:
                summary = export_ram(args.ram, key, sink, work_dir=work, page_map=args.page_map,
                                     challenge=lambda: _socket_challenge(sock, args.ram),
                                     zero_ranges=args.zero_ranges, confirm=lambda: _receiver_proof(sock, sink),
                                     **_helper_options(args))
            except BaseException as exc:
                # A receiver that refuses writes its verdict and closes: what
                # this end sees is a failed write or a challenge that is none.
                refusal = _receiver_refusal(sock) if isinstance(exc, (OSError, OvmfMhError)) else None
                # Closing the buffered sink would flush into a dead or stalled
                # connection (another idle timeout): drop the connection first.
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    sink.close()
                if refusal is not None:
                    raise OvmfMhError(f"the receiver at {args.to} refused the transfer: {refusal}") from exc
                raise
    except TimeoutError as exc:
        return _report(args, summary, OvmfMhError(
            f"the receiver at {args.to} took no data and sent no verdict for {args.idle_timeout:g} s "
            "(--idle-timeout); it is stalled or overloaded; the transfer is abandoned"), "send", exc)
    except (BrokenPipeError, ConnectionResetError) as exc:
        return _report(args, summary, _peer_gone(args, exc), "send", exc)
    except OSError as exc:
        return _report(args, summary, OvmfMhError(f"connection to the receiver at {args.to} failed: {exc}"),
                       "send", exc)
    except OvmfMhError as exc:
        return _report(args, summary, exc, "send")
    summary.direction = "send"
    return _report(args, summary, None, "send")


class _SocketReader:
    """Exactly the bytes asked for from a socket (no read-ahead: the verdict
    follows on the same connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        return self.sock.recv(size)


def _socket_challenge(sock: socket.socket, ram: Path) -> Nonces:
    """The receiver's challenge, sent once it read the file header."""
    if sock.recv(1, socket.MSG_PEEK) == b"{":
        # Not a challenge: the receiver refused the header and sent its verdict.
        raise OvmfMhError(f"the receiver refused the transfer: {_receiver_refusal(sock)}")
    nonces, guest_size = read_challenge(_SocketReader(sock))
    if guest_size != ram.stat().st_size:
        raise OvmfMhError(f"the receiver's challenge is for a {guest_size}-byte guest, not {ram.stat().st_size}")
    return nonces


def _peer_gone(args: argparse.Namespace, exc: OSError) -> OvmfMhError:
    return OvmfMhError(
        f"the receiver at {args.to} closed the connection during the transfer ({exc.strerror or exc}): it "
        "stopped or failed; its own output says why; nothing was imported there")


def _receiver_refusal(sock: socket.socket) -> str | None:
    """The error of a failed verdict the receiver already sent, if any (read
    for at most 1 s: a refusing receiver has written it before closing)."""
    data = b""
    with suppress(OSError):
        sock.settimeout(1.0)
        while len(data) < VERDICT_LIMIT:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    with suppress(UnicodeDecodeError, ValueError):
        verdict = json.loads(data.decode())
        if isinstance(verdict, dict) and verdict.get("outcome") == "failed":
            return str(verdict.get("error"))
    return None


def _receiver_proof(sock: socket.socket, sink: IO[bytes]) -> bytes:
    """Once the stream is out: the receiver's verdict, and in it the commit
    proof of its target helper 0, which the source helpers then check. An
    "ok" without a proof they accept is no success (a man in the middle can
    write "ok"; only helpers holding the key can write the proof)."""
    sink.close()
    sock.shutdown(socket.SHUT_WR)
    verdict = _read_verdict(sock)
    if verdict.get("outcome") != "ok":
        raise OvmfMhError(f"receiver reports failure: {verdict.get('error')}")
    return commit_proof.from_hex(verdict.get("commit_proof"), "receiver")


def _read_verdict(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while len(data) < VERDICT_LIMIT:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    try:
        verdict = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        raise OvmfMhError("receiver closed the connection without a verdict") from None
    if not isinstance(verdict, dict):
        raise OvmfMhError("receiver sent a malformed verdict")
    return verdict


class _CountingReader:
    """The connection's reader, noting how much arrived and whether it ended."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.bytes = 0
        self.ended = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.bytes += len(data)
        if size and len(data) < size:
            self.ended = True
        return data


def _let_the_sender_read(conn: socket.socket, seconds: float = 2.0) -> None:
    """After a refusal's verdict: end this side's writing and take what the
    sender still sends (at most ``seconds``), so that closing with unread
    data does not reset the connection and discard the verdict on its way."""
    conn.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        if not conn.recv(1 << 20):
            return


def run_receive(args: argparse.Namespace) -> int:
    _firmware(args)  # first: a refused --image leaves nothing behind
    key = read_key(args.key)
    work = _work_dir(args, "receive")
    host, port = _address(args.listen)
    try:
        server = socket.create_server((host, port))
    except OSError as exc:
        return _report(args, None, OvmfMhError(f"cannot listen on {args.listen}: {exc.strerror or exc}"), "receive")
    with server:
        server.settimeout(args.accept_timeout)
        print(f"listening on {host}:{server.getsockname()[1]}", file=sys.stderr, flush=True)
        try:
            conn, peer = server.accept()
        except TimeoutError:
            return _report(args, None, OvmfMhError(
                f"no sender connected to {args.listen} within {args.accept_timeout:g} s (--accept-timeout)"),
                "receive")
    with conn:
        conn.settimeout(args.idle_timeout)
        summary: TransferSummary | None = None
        error: OvmfMhError | None = None
        cause: BaseException | None = None
        reader: _CountingReader | None = None
        # Alive means progress: a frame that carries work within
        # --idle-timeout of waiting (host_shim/transfer/liveness.py).
        liveness = Liveness(args.idle_timeout, f"sender {peer[0]}:{peer[1]}", "--idle-timeout")

        def challenge(nonces: Nonces, size: int) -> None:
            conn.sendall(encode_challenge(nonces, size))
            liveness.progressed()  # the sender's helpers start now

        try:
            with io.BufferedReader(LiveSocketIO(conn, liveness), buffer_size=1024 * 1024) as raw:
                reader = _CountingReader(cast(IO[bytes], raw))
                summary = import_ram(args.ram, key, cast(IO[bytes], reader), work_dir=work,
                                     challenge=challenge, on_frame=liveness.on_frame, **_helper_options(args))
        except OvmfMhError as exc:
            error, cause = exc, exc
            if reader is not None and reader.ended:
                error = OvmfMhError(
                    f"the sender {peer[0]}:{peer[1]} closed the connection after {reader.bytes} bytes, before the "
                    f"end of the stream: it stopped or failed (its own output says why); nothing was kept "
                    f"({exc})")
        except StreamStalled as exc:
            cause = exc
            error = OvmfMhError(f"{exc}; import abandoned, nothing was kept")
        except TimeoutError as exc:
            cause = exc
            error = OvmfMhError(f"the sender {peer[0]}:{peer[1]} sent nothing for {args.idle_timeout:g} s "
                                "(--idle-timeout): it is stalled (stopped?) or overloaded; import abandoned, "
                                "nothing was kept")
        except ConnectionResetError as exc:
            cause = exc
            error = OvmfMhError(f"the sender {peer[0]}:{peer[1]} closed the connection (reset) before the end of the "
                                "stream: it stopped or failed (its own output says why); nothing was kept")
        except OSError as exc:
            cause = exc
            error = OvmfMhError(f"the connection from the sender failed: {exc.strerror or exc}; nothing was kept")
        verdict = summary.as_json() if summary else {"outcome": "failed", "error": str(error)}
        with suppress(OSError):
            conn.sendall(json.dumps(verdict).encode())
            if summary is None:
                _let_the_sender_read(conn)
    if summary is not None:
        summary.direction = "receive"
    return _report(args, summary, error, "receive", cause)
