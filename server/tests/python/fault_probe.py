"""Drives an nbdfault export with libnbd (python3-libnbd) for server/tests/faults.rs and friends.

    /usr/bin/python3 fault_probe.py SCENARIO ARGS...

The scenarios report what happened as JSON on stdout and leave the judging to the Rust tests,
which know the policy. libnbd reports the server's errno unchanged (the Linux client would turn
every one into EIO), so the tests can check the configured errno itself.
"""

import errno
import json
import os
import socket
import struct
import sys
import time
import urllib.request

import nbd

KIB = 1024

# How long a scenario waits for something the server should do promptly before giving up.
PATIENCE = 60.0


def connect(uri):
    h = nbd.NBD()
    h.set_request_structured_replies(True)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def errno_name(number):
    return errno.errorcode.get(number, str(number))


def pattern(byte, length):
    return bytes([byte]) * length


def parse(words):
    """An operation's words as its name, its FUA flag and its numbers."""
    name, args = words[0], words[1:]
    fua = nbd.CMD_FLAG_FUA if "fua" in args else 0
    return name, fua, [int(a, 0) for a in args if a != "fua"]


def request(h, name, fua, args, result):
    """Sends one synchronous request of `ops` (write, read, flush, zero, trim, cache, status) on
    h, a read's data into result; False for a name that is none of them."""
    if name == "write":
        offset, length, byte = args
        h.pwrite(pattern(byte, length), offset, fua)
    elif name == "read":
        offset, length = args
        result["data"] = bytes(h.pread(length, offset)).hex()
    elif name == "flush":
        h.flush()
    elif name == "zero":
        offset, length = args
        h.zero(length, offset, fua)
    elif name == "trim":
        offset, length = args
        h.trim(length, offset, fua)
    elif name == "cache":
        offset, length = args
        h.cache(length, offset)
    elif name == "status":
        offset, length = args
        h.block_status(length, offset, lambda *a: 0)
    else:
        return False
    return True


# ---- ops: a sequence of synchronous requests ----------------------------------------------------


def ops(uri, *operations):
    """Runs each operation in order and prints one JSON line per operation:
    {"op": TEXT, "errno": null | "EIO", "data": HEX (reads)}.

    write OFFSET LENGTH BYTE [fua] | read OFFSET LENGTH | flush | zero OFFSET LENGTH [fua]
    trim OFFSET LENGTH | cache OFFSET LENGTH | status OFFSET LENGTH (block status) | reconnect
    """
    h = connect(uri)
    for text in operations:
        name, fua, args = parse(text.split())
        result = {"op": text, "errno": None}
        try:
            if name == "reconnect":
                h = connect(uri)
            elif not request(h, name, fua, args, result):
                sys.exit(f"ops: unknown operation {text!r}")
        except nbd.Error as error:
            result["errno"] = errno_name(error.errnum) if error.errnum else "ENOTCONN"
            result["message"] = error.string
        print(json.dumps(result), flush=True)


# ---- asynchronous requests on one handle ---------------------------------------------------------


class Tracker:
    """Issues asynchronous requests on one handle and records the order they complete in."""

    def __init__(self, h):
        self.h = h
        self.order = []
        self.errors = {}
        self.buffers = []

    def _done(self, tag):
        def callback(err):
            self.order.append(tag)
            if err.value:
                self.errors[tag] = errno_name(err.value)
            return 1  # retire the command: the callback has seen its result

        return callback

    def write(self, tag, offset, byte, length=4 * KIB):
        buf = nbd.Buffer.from_bytearray(bytearray(pattern(byte, length)))
        self.buffers.append(buf)
        self.h.aio_pwrite(buf, offset, completion=self._done(tag))

    def flush(self, tag):
        self.h.aio_flush(completion=self._done(tag))

    def read(self, tag, offset, length=4 * KIB):
        buf = nbd.Buffer(length)
        self.buffers.append(buf)
        self.h.aio_pread(buf, offset, completion=self._done(tag))

    def wait_until(self, condition, what):
        deadline = time.monotonic() + PATIENCE
        while not condition():
            if time.monotonic() > deadline:
                sys.exit(f"{what}: not within {PATIENCE} s; completed so far: {self.order}")
            self.h.poll(1000)

    def report(self, **extra):
        print(json.dumps({"order": self.order, "errors": self.errors, **extra}), flush=True)


def overtaken(uri, delayed_offset, others):
    """Writes at `delayed_offset` (which the policy delays), then `others` writes and reads
    elsewhere on the same handle; reports the order they complete in."""
    delayed_offset, others = int(delayed_offset), int(others)
    h = connect(uri)
    t = Tracker(h)
    t.write("delayed", delayed_offset, 0xDD)
    for i in range(others):
        offset = (i + 1) * 64 * KIB
        if i % 2 == 0:
            t.write(f"write-{i}", offset, i + 1)
        else:
            t.read(f"read-{i}", offset)
    t.wait_until(lambda: h.aio_in_flight() == 0, "every request completes")
    t.report()
    h.shutdown()


def control_call(control, call):
    """`METHOD PATH` against the control API; returns the JSON answer."""
    method, path = call.split(" ", 1)
    request = urllib.request.Request(f"{control}{path}", method=method)
    with urllib.request.urlopen(request, timeout=PATIENCE) as answer:
        return json.load(answer)


def stalled(uri, stalled_offset, others, control, release, *between):
    """Writes at `stalled_offset` (which the policy stalls), then `others` requests elsewhere;
    once they have all completed, makes each `between` control call (`METHOD PATH`) followed by
    `others` more requests, then releases the stall: `release` is a control call, or `flush` (for
    a rule that arms the trigger). Reports the order, and how many requests were in flight (only
    the stalled one, if it really waited) just before the release."""
    stalled_offset, others = int(stalled_offset), int(others)
    h = connect(uri)
    t = Tracker(h)
    t.write("stalled", stalled_offset, 0x55)
    batches = [None, *between]
    for batch, call in enumerate(batches):
        if call:
            control_call(control, call)
        for i in range(others):
            offset = (batch * others + i + 1) * 64 * KIB
            if i % 2 == 0:
                t.write(f"write-{batch}-{i}", offset, i + 1)
            else:
                t.read(f"read-{batch}-{i}", offset)
        done = (batch + 1) * others
        t.wait_until(lambda: len([tag for tag in t.order if tag != "stalled"]) == done, "the other requests complete")
    in_flight = h.aio_in_flight()
    if release == "flush":
        t.flush("release")
    else:
        control_call(control, release)
    t.wait_until(lambda: h.aio_in_flight() == 0, "the stalled write completes once released")
    t.report(in_flight_before_release=in_flight)
    h.shutdown()


def pipelined(uri, count):
    """Sends `count` requests at once on one handle (writes, reads and flushes in turn, request i
    at offset i * 4 KiB), then waits for every answer; the client sends them in that order."""
    count = int(count)
    h = connect(uri)
    t = Tracker(h)
    for i in range(count):
        if i % 8 == 7:
            t.flush(f"flush-{i}")
        elif i % 2 == 0:
            t.write(f"write-{i}", i * 4 * KIB, i % 256)
        else:
            t.read(f"read-{i}", i * 4 * KIB)
    t.wait_until(lambda: h.aio_in_flight() == 0, "every request is answered")
    t.report()
    h.shutdown()


def one_write(uri, offset):
    """Writes one block asynchronously and waits for its answer, however long the server holds
    it; reports {"errno": null | "EIO" | ...}."""
    h = connect(uri)
    t = Tracker(h)
    t.write("write", int(offset), 0x77)
    t.wait_until(lambda: h.aio_in_flight() == 0, "the write is answered")
    print(json.dumps({"errno": t.errors.get("write")}), flush=True)


def busy(uri, offset, stop_file, results_file):
    """Writes the same block again and again until `stop_file` exists, appending each result
    ("ok" or the errno) to `results_file`, one per line, so a test can change the policy while
    I/O goes on and see which requests each policy decided."""
    offset = int(offset)
    h = connect(uri)
    data = pattern(0xB5, 4 * KIB)
    deadline = time.monotonic() + PATIENCE
    with open(results_file, "a", buffering=1) as out:
        while not os.path.exists(stop_file):
            if time.monotonic() > deadline:
                sys.exit(f"busy: {stop_file} did not appear within {PATIENCE} s")
            try:
                h.pwrite(data, offset)
                out.write("ok\n")
            except nbd.Error as error:
                out.write(errno_name(error.errnum) + "\n")
    h.shutdown()


def abandon(uri, busy_uri, busy_length, count, control, call):
    """A client that dies while its requests wait for the server's I/O threads. First the I/O
    threads are made busy for a while: BUSY WRITE_ZEROES of `busy_length` bytes with NO_HOLE on
    `busy_uri` (an image in tmpfs, which cannot zero a range in place, so the server writes the
    zeros). Then `count` WRITE_ZEROES of 4 KiB on `uri` (one after the other from offset 0) are
    sent, the connection to `uri` dies at once (a reset, no NBD_CMD_DISC, as when the client's
    machine goes) and the control call `call` (`METHOD PATH`) is made. Reports
    {"call": its answer, "busy_errors": errors of the busy requests}."""
    busy_length, count = int(busy_length), int(count)
    h = connect(uri)
    busy = connect(busy_uri)
    b = Tracker(busy)
    for i in range(BUSY):
        busy.aio_zero(busy_length, 0, completion=b._done(f"busy-{i}"), flags=nbd.CMD_FLAG_NO_HOLE)
    settle(busy, 0.005)
    for i in range(count):
        h.aio_zero(4 * KIB, i * 4 * KIB)
    settle(h, 0.005)
    # SO_LINGER 0: closing the last descriptor resets the connection instead of a FIN.
    fd = h.aio_get_fd()
    dead = socket.socket(fileno=os.dup(fd))
    dead.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    os.close(fd)
    dead.close()
    answer = control_call(control, call)
    b.wait_until(lambda: len(b.order) == BUSY, "the busy requests are answered")
    print(json.dumps({"call": answer, "busy_errors": b.errors}), flush=True)
    # The dead handle holds a closed descriptor: leave without closing it.
    os._exit(0)


# The busy requests of `abandon`: three per I/O thread of the server.
BUSY = 6


def settle(h, seconds):
    """Lets libnbd send what it queued, for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        h.poll(1)


# ---- connections: several handles, one script ----------------------------------------------------


def connections(uri, count, *operations):
    """Opens `count` connections to `uri`, then runs the operations in order, each on the
    connection its prefix names, and prints one JSON line per operation as `ops` does, with
    "connection": N. `N:OP` is an operation of `ops` (write, read, flush, zero, trim) on
    connection N (from 1); `N:reconnect` opens connection N again; `N:start-stall OFFSET` sends a
    write of 4 KiB at OFFSET without waiting for its reply; `N:stalled` waits for that reply;
    `pause` prints {"op": "pause"} and waits for a line on stdin (the test acts in between).
    """
    handles = [connect(uri) for _ in range(int(count))]
    pending = {}
    for text in operations:
        if text == "pause":
            print(json.dumps({"op": "pause"}), flush=True)
            if not sys.stdin.readline():
                sys.exit("connections: stdin closed during a pause")
            continue
        number, _, command = text.partition(":")
        index = int(number) - 1
        name, fua, args = parse(command.split())
        result = {"op": text, "connection": index + 1, "errno": None}
        h = handles[index]
        try:
            if name == "reconnect":
                handles[index] = connect(uri)
            elif name == "start-stall":
                (offset,) = args
                buf = nbd.Buffer.from_bytearray(bytearray(pattern(0x5A, 4 * KIB)))
                done = {}

                def finished(err, done=done):
                    done["errno"] = errno_name(err.value) if err.value else None
                    return 1

                h.aio_pwrite(buf, offset, completion=finished)
                pending[index] = (buf, done)
            elif name == "stalled":
                _, done = pending.pop(index)
                deadline = time.monotonic() + PATIENCE
                while "errno" not in done and not h.aio_is_dead() and time.monotonic() < deadline:
                    h.poll(100)
                if "errno" in done:
                    result["errno"] = done["errno"]
                elif h.aio_is_dead():
                    result["errno"] = "ENOTCONN"
                else:
                    sys.exit(f"connections: the stalled write on connection {index + 1} never finished")
            elif not request(h, name, fua, args, result):
                sys.exit(f"connections: unknown operation {text!r}")
        except nbd.Error as error:
            result["errno"] = errno_name(error.errnum) if error.errnum else "ENOTCONN"
            result["message"] = error.string
        print(json.dumps(result), flush=True)


SCENARIOS = {
    "ops": ops,
    "connections": connections,
    "overtaken": overtaken,
    "stalled": stalled,
    "busy": busy,
    "one-write": one_write,
    "pipelined": pipelined,
    "abandon": abandon,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SCENARIOS)}}} ARGS...")
    SCENARIOS[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
