"""Probes an NBD server with libnbd (python3-libnbd), as server/tests/libnbd.rs asks.

    /usr/bin/python3 nbd_probe.py SCENARIO ARGS...

Strict mode is off, so libnbd sends what a careful client never would: out-of-range, oversized,
zero-length and wrongly flagged requests. After every bad request the same handle must go on
working. Each scenario exits 0 when the server behaved, and 1 with what went wrong otherwise.
"""

import errno
import os
import sys
import threading

import nbd

KIB = 1024
MIB = 1024 * KIB


class Failed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failed(message)


def connect(uri, structured=True):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def expect_error(expected, what, call):
    """Runs `call`, which must fail with one of the errno values in `expected`."""
    if isinstance(expected, int):
        expected = (expected,)
    try:
        call()
    except nbd.Error as error:
        names = [errno.errorcode[e] for e in expected]
        check(
            error.errnum in expected,
            f"{what}: expected {'/'.join(names)}, got errno {error.errnum} "
            f"({errno.errorcode.get(error.errnum)}): {error.string}",
        )
        return error
    raise Failed(f"{what}: expected an error, the request succeeded")


def still_works(h, what):
    """A write and a read on the same handle, after a bad request."""
    data = os.urandom(4096)
    scratch = h.get_size() // 2  # away from what the scenarios check
    try:
        h.pwrite(data, scratch)
        back = h.pread(4096, scratch)
    except nbd.Error as error:
        raise Failed(f"after {what} the connection no longer works: {error}") from error
    check(bytes(back) == data, f"after {what} a write did not read back")


def still_reads(h, what):
    try:
        h.pread(512, 0)
    except nbd.Error as error:
        raise Failed(f"after {what} the connection no longer works: {error}") from error


# ---- bad requests ----------------------------------------------------------------------------


def out_of_range(uri):
    h = connect(uri)
    size = h.get_size()
    top = 2**64 - 1
    cases = [
        ("READ past the end", errno.EINVAL, lambda: h.pread(2, size - 1)),
        ("READ at the end", errno.EINVAL, lambda: h.pread(1, size)),
        ("READ whose offset+length overflows", errno.EINVAL, lambda: h.pread(2, top)),
        ("WRITE past the end", errno.ENOSPC, lambda: h.pwrite(b"ab", size - 1)),
        ("WRITE whose offset+length overflows", errno.ENOSPC, lambda: h.pwrite(b"ab", top)),
        ("WRITE_ZEROES past the end", errno.ENOSPC, lambda: h.zero(4096, size - 512)),
        ("WRITE_ZEROES whose offset+length overflows", errno.ENOSPC, lambda: h.zero(4096, top - 100)),
        ("TRIM past the end", errno.EINVAL, lambda: h.trim(4096, size - 512)),
        ("TRIM whose offset+length overflows", errno.EINVAL, lambda: h.trim(4096, top - 100)),
        ("CACHE past the end", errno.EINVAL, lambda: h.cache(4096, size - 512)),
        ("BLOCK_STATUS past the end", errno.EINVAL, lambda: h.block_status(4096, size, lambda *a: 0)),
        ("BLOCK_STATUS whose offset+length overflows", errno.EINVAL, lambda: h.block_status(4096, top, lambda *a: 0)),
    ]
    for what, expected, call in cases:
        expect_error(expected, what, call)
        still_works(h, what)
    # Right up to the end is fine.
    h.pwrite(b"last", size - 4)
    check(bytes(h.pread(4, size - 4)) == b"last", "a write that ends at the end of the export")
    h.zero(4, size - 4)
    check(bytes(h.pread(4, size - 4)) == b"\0" * 4, "zeroing the last bytes")
    h.shutdown()


def unknown_flags(uri):
    h = connect(uri)
    cases = [
        ("READ with an unknown flag", lambda: h.pread(512, 0, 1 << 9)),
        ("READ with REQ_ONE", lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("WRITE with NO_HOLE", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("WRITE with DF", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_DF)),
        ("WRITE with an unknown flag", lambda: h.pwrite(b"x" * 512, 0, 1 << 12)),
        ("TRIM with NO_HOLE", lambda: h.trim(512, 0, nbd.CMD_FLAG_NO_HOLE)),
        ("WRITE_ZEROES with REQ_ONE", lambda: h.zero(512, 0, nbd.CMD_FLAG_REQ_ONE)),
        ("FLUSH with DF", lambda: h.flush(nbd.CMD_FLAG_DF)),
        ("BLOCK_STATUS with DF", lambda: h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_DF)),
    ]
    for what, call in cases:
        expect_error(errno.EINVAL, what, call)
        still_works(h, what)
    check(bytes(h.pread(512, 0)) == b"\0" * 512, "a refused WRITE changed the data")
    # FUA is accepted on every command when it is advertised (clients set it on reads too).
    h.pwrite(b"fua" * 100, 0, nbd.CMD_FLAG_FUA)
    h.pread(300, 0, nbd.CMD_FLAG_FUA)
    h.zero(512, 4096, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    h.trim(512, 4096, nbd.CMD_FLAG_FUA)
    h.shutdown()


def fill(uri, mib):
    """Writes `mib` MiB of random data from offset 0, one MiB per request."""
    h = connect(uri)
    for i in range(int(mib)):
        h.pwrite(os.urandom(MIB), i * MIB)
    h.shutdown()


def oversized(uri):
    h = connect(uri)
    h.pwrite(b"\x5a" * 4096, 0)
    for what, expected, call in [
        ("READ of 32 MiB + 1", (errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW), lambda: h.pread(32 * MIB + 1, 0)),
        ("READ of 63 MiB", (errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW), lambda: h.pread(63 * MIB, 0)),
        ("WRITE of 40 MiB", (errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW), lambda: h.pwrite(bytes(40 * MIB), 0)),
        ("WRITE of 63 MiB", (errno.EINVAL, errno.ENOMEM, errno.EOVERFLOW), lambda: h.pwrite(bytes(63 * MIB), 0)),
    ]:
        expect_error(expected, what, call)
        still_works(h, what)
    check(bytes(h.pread(4096, 0)) == b"\x5a" * 4096, "a refused oversized WRITE changed the data")
    h.shutdown()


def largest(uri):
    h = connect(uri)
    # Exactly 32 MiB is allowed both ways.
    data = os.urandom(32 * MIB)
    h.pwrite(data, 0)
    check(bytes(h.pread(32 * MIB, 0)) == data, "a 32 MiB write did not read back")
    # Payload-free commands may be far larger than 32 MiB.
    h.zero(48 * MIB, 0)
    h.trim(48 * MIB, 0)
    h.cache(48 * MIB, 0)
    check(bytes(h.pread(4096, 0)) == bytes(4096), "48 MiB WRITE_ZEROES")
    h.shutdown()


def zero_length(uri):
    h = connect(uri)
    h.pwrite(b"kept", 0)
    size = h.get_size()
    # Unspecified by the protocol; the server must not disconnect, and nbdfault answers success.
    for what, call in [
        ("READ of 0 bytes", lambda: h.pread(0, 0)),
        ("READ of 0 bytes at the end", lambda: h.pread(0, size)),
        ("WRITE of 0 bytes", lambda: h.pwrite(b"", 0)),
        ("TRIM of 0 bytes", lambda: h.trim(0, 0)),
        ("WRITE_ZEROES of 0 bytes", lambda: h.zero(0, 0)),
        ("CACHE of 0 bytes", lambda: h.cache(0, 0)),
    ]:
        try:
            call()
        except nbd.Error as error:
            raise Failed(f"{what} failed: {error}") from error
        still_works(h, what)
    expect_error(errno.EINVAL, "BLOCK_STATUS of 0 bytes", lambda: h.block_status(0, 0, lambda *a: 0))
    still_works(h, "BLOCK_STATUS of 0 bytes")
    check(bytes(h.pread(4, 0)) == b"kept", "a zero-length request changed the data")
    # Without structured replies too.
    h = connect(uri, structured=False)
    h.pread(0, 0)
    h.pwrite(b"", 0)
    still_works(h, "zero-length requests with simple replies")
    h.shutdown()


def read_only(uri):
    h = connect(uri)
    check(h.is_read_only(), "the export says it is read-only")
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"):
        check(not getattr(h, flag)(), f"a read-only export must not offer {flag}")
    before = bytes(h.pread(4096, 0))
    for what, call in [
        ("WRITE", lambda: h.pwrite(b"no" * 2048, 0)),
        ("WRITE with FUA", lambda: h.pwrite(b"no" * 2048, 0, nbd.CMD_FLAG_FUA)),
        ("WRITE_ZEROES", lambda: h.zero(4096, 0)),
        ("TRIM", lambda: h.trim(4096, 0)),
    ]:
        expect_error(errno.EPERM, what + " on a read-only export", call)
        still_reads(h, what)
    check(bytes(h.pread(4096, 0)) == before, "a refused write changed a read-only export")
    # Reading, caching and block status are fine.
    h.cache(4096, 0)
    h.block_status(4096, 0, lambda *a: 0)
    h.shutdown()


def block_status(uri):
    h = connect(uri)
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation is negotiated")
    size = h.get_size()
    # Data at [1 MiB, 2 MiB), holes elsewhere.
    h.pwrite(os.urandom(MIB), MIB)

    def collect(length, offset, flags=0):
        seen = []

        def callback(metacontext, offset, entries, err):
            check(metacontext == nbd.CONTEXT_BASE_ALLOCATION, f"context {metacontext}")
            seen.append(list(entries))
            return 0

        h.block_status(length, offset, callback, flags)
        check(len(seen) == 1, f"exactly one block status chunk per context, got {len(seen)}")
        entries = seen[0]
        check(len(entries) % 2 == 0 and entries, f"extents come in (length, flags) pairs: {entries}")
        return [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]

    for offset, length in [(0, 4 * MIB), (MIB - 4096, 8192), (0, size), (size - 4096, 4096)]:
        extents = collect(length, offset)
        check(all(e[0] > 0 for e in extents), f"empty extent in {extents}")
        check(sum(e[0] for e in extents[:-1]) < length, f"all but the last extent lie inside the request: {extents}")
        one = collect(length, offset, nbd.CMD_FLAG_REQ_ONE)
        check(len(one) == 1 and 0 < one[0][0] <= length, f"REQ_ONE: one extent, no longer than asked: {one}")
        check(one[0] == (min(extents[0][0], length), extents[0][1]), f"REQ_ONE {one} vs {extents}")

    # Walk the whole start of the export: a hole, then data, then a hole.
    position, walked = 0, []
    while position < 4 * MIB:
        extent = collect(4 * MIB - position, position)[0]
        walked.append((position, min(extent[0], 4 * MIB - position), extent[1]))
        position += extent[0]
    data = [(start, length) for start, length, flags in walked if flags & nbd.STATE_HOLE == 0]
    holes_zero = all(flags == nbd.STATE_HOLE | nbd.STATE_ZERO for _, _, flags in walked if flags & nbd.STATE_HOLE)
    check(data == [(MIB, MIB)], f"data is exactly the written megabyte: {walked}")
    check(holes_zero, f"holes read as zeros: {walked}")
    # Zeroing the data makes it a hole again (memory storage frees whole chunks).
    h.zero(MIB, MIB)
    check(collect(MIB, MIB, nbd.CMD_FLAG_REQ_ONE)[0][1] & nbd.STATE_ZERO, "zeroed data reads as zero")
    h.shutdown()


def df_reads(uri):
    h = connect(uri)
    check(h.can_df(), "DF is offered with structured replies")
    data = os.urandom(64 * KIB)
    h.pwrite(data, 64 * KIB)
    for offset, expected in [(64 * KIB, data), (4 * MIB, bytes(64 * KIB)), (32 * KIB, bytes(32 * KIB) + data[:32 * KIB])]:
        chunks = []

        def callback(subbuf, offset, status, error):
            chunks.append((offset, status, bytes(subbuf)))
            return 0

        buf = h.pread_structured(64 * KIB, offset, callback, nbd.CMD_FLAG_DF)
        check(len(chunks) == 1, f"a DF read arrives in one chunk, got {len(chunks)}")
        check(chunks[0][0] == offset, "the chunk starts at the request's offset")
        check(bytes(buf) == expected, f"a DF read at {offset} returned other bytes")
    h.shutdown()
    # Without structured replies there is no DF.
    h = connect(uri, structured=False)
    check(not h.can_df(), "DF must not be offered without structured replies")
    expect_error(errno.EINVAL, "DF without structured replies", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
    still_works(h, "DF without structured replies")
    h.shutdown()


def fast_zero(uri):
    h = connect(uri)
    check(h.can_fast_zero(), "FAST_ZERO is offered")
    data = os.urandom(256 * KIB)
    h.pwrite(data, 0)
    try:
        h.zero(128 * KIB, 64 * KIB, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as error:
        check(error.errnum == errno.ENOTSUP, f"FAST_ZERO may only fail with ENOTSUP, got {error}")
        check(bytes(h.pread(256 * KIB, 0)) == data, "a failed FAST_ZERO must change nothing")
    else:
        expected = data[: 64 * KIB] + bytes(128 * KIB) + data[192 * KIB :]
        check(bytes(h.pread(256 * KIB, 0)) == expected, "FAST_ZERO zeroed the range")
    # With NO_HOLE as well.
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    check(bytes(h.pread(4096, 0)) == bytes(4096), "FAST_ZERO with NO_HOLE zeroed the range")
    still_works(h, "FAST_ZERO")
    h.shutdown()


def huge_zero(uri):
    """TRIM and WRITE_ZEROES of nearly 4 GiB (what the kernel sends) in one request each."""
    h = connect(uri)
    size = h.get_size()
    check(size >= 8 * 1024 * MIB, f"this scenario needs an export of 8 GiB or more, not {size}")
    most = 0xFFFFFE00
    data = os.urandom(MIB)
    for what, offset, flags, call in [
        ("TRIM", 0, 0, h.trim),
        ("WRITE_ZEROES", 0, 0, h.zero),
        ("WRITE_ZEROES with FAST_ZERO", 4096, nbd.CMD_FLAG_FAST_ZERO, h.zero),
        ("WRITE_ZEROES with FUA", 4 * 1024 * MIB, nbd.CMD_FLAG_FUA, h.zero),
    ]:
        inside = offset + 1024 * MIB
        h.pwrite(data, inside)
        try:
            call(most, offset, flags)
        except nbd.Error as error:
            if not (error.errnum == errno.ENOTSUP and flags & nbd.CMD_FLAG_FAST_ZERO):
                raise Failed(f"{what} of nearly 4 GiB failed: {error}") from error
            continue
        if what != "TRIM":  # TRIM is advisory: the data may stay
            check(bytes(h.pread(MIB, inside)) == bytes(MIB), f"{what} of nearly 4 GiB left data behind")
    still_works(h, "huge requests")
    h.shutdown()


# ---- the option phase ------------------------------------------------------------------------


def options(host, port):
    port = int(port)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_tcp(host, str(port))
    check(h.aio_is_negotiating(), "opt mode stops in negotiation")

    listed = []
    count = h.opt_list(lambda name, description: listed.append((name, description)) or 0)
    check(count == len(listed), f"opt_list counted {count} and called back {len(listed)} times")
    names = sorted(name for name, _ in listed)
    check(names == ["", "disk", "ro"], f"LIST names every export: {listed}")
    check(("disk", "the disk") in listed, f"LIST carries descriptions: {listed}")

    h.set_export_name("disk")
    h.opt_info()
    check(h.get_size() == 8 * MIB, f"INFO size {h.get_size()}")
    check(not h.is_read_only() and h.can_flush() and h.can_trim() and h.can_multi_conn(), "INFO flags of disk")
    check(h.get_canonical_export_name() == "disk", "INFO carries the name")
    check(h.get_export_description() == "the disk", "INFO carries the description")
    minimum, preferred, maximum = (h.get_block_size(s) for s in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
    check(minimum >= 1 and preferred >= 512 and maximum >= 32 * MIB, f"block sizes {minimum} {preferred} {maximum}")

    h.set_export_name("ro")
    h.opt_info()
    check(h.is_read_only() and h.get_size() == MIB, "INFO of the read-only export")

    h.set_export_name("nope")
    try:
        h.opt_info()
    except nbd.Error as error:
        # libnbd turns NBD_REP_ERR_UNKNOWN into ENOENT.
        check(error.errnum == errno.ENOENT, f"INFO of an unknown export: {error}")
    else:
        raise Failed("INFO of an unknown export succeeded")
    check(h.aio_is_negotiating(), "an unknown export leaves the client negotiating")

    h.set_export_name("disk")
    for query in (None, nbd.CONTEXT_BASE_ALLOCATION):
        # First with no query (list everything), then asking for base:allocation itself.
        if query:
            h.add_meta_context(query)
        contexts = []
        count = h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
        check(contexts == ["base:allocation"] and count == 1, f"LIST_META_CONTEXT {query}: {contexts}")

    h.opt_go()
    check(h.aio_is_ready(), "GO enters transmission")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation is selected by GO")
    h.pwrite(b"after GO", 0)
    check(bytes(h.pread(8, 0)) == b"after GO", "I/O after opt_go")
    h.shutdown()

    # ABORT ends the handshake cleanly.
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_tcp(host, str(port))
    h.opt_abort()
    check(h.aio_is_closed() or not h.aio_is_negotiating(), "opt_abort closes the connection")

    # GO to an unknown export fails, naming what there is.
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd://{host}:{port}/nope")
    except nbd.Error as error:
        check(error.errnum == errno.ENOENT, f"GO to an unknown export: {error}")
    else:
        raise Failed("GO to an unknown export succeeded")


def old_clients(uri):
    # A client that does not ask for structured replies gets simple replies.
    h = connect(uri, structured=False)
    check(not h.get_structured_replies_negotiated(), "structured replies were not asked for")
    check(not h.can_df(), "no DF without structured replies")
    data = os.urandom(MIB)
    h.pwrite(data, 0)
    check(bytes(h.pread(MIB, 0)) == data, "simple replies carry reads")
    expect_error(errno.EINVAL, "READ past the end, simple replies", lambda: h.pread(2, h.get_size() - 1))
    still_works(h, "an error with simple replies")
    h.shutdown()

    # Oldest newstyle: no fixed newstyle, no NO_ZEROES, so EXPORT_NAME and 124 zero bytes.
    for flags in (0, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE, nbd.HANDSHAKE_FLAG_NO_ZEROES):
        h = nbd.NBD()
        h.set_handshake_flags(flags)
        h.set_request_structured_replies(False)
        h.connect_uri(uri)
        check(h.get_protocol() == "newstyle" or flags & 1, f"flags {flags}: protocol {h.get_protocol()}")
        check(h.get_size() == 8 * MIB, f"flags {flags}: size {h.get_size()}")
        check(bytes(h.pread(MIB, 0)) == data, f"flags {flags}: reads see the data")
        h.pwrite(b"old", 4 * MIB)
        check(bytes(h.pread(3, 4 * MIB)) == b"old", f"flags {flags}: writes")
        h.flush()
        h.shutdown()

    # EXPORT_NAME cannot report an error: an unknown export is a dropped connection.
    h = nbd.NBD()
    h.set_handshake_flags(0)
    try:
        h.connect_uri(uri.rsplit("/", 1)[0] + "/nope")
    except nbd.Error:
        pass
    else:
        raise Failed("EXPORT_NAME of an unknown export succeeded")


# ---- many connections, many requests ---------------------------------------------------------


def in_threads(target, count):
    """Runs target(0) ... target(count - 1) in threads at once and waits for all of them."""
    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def multi_conn(uri, connections="4", depth="64"):
    connections, depth = int(connections), int(depth)
    handles = [connect(uri) for _ in range(connections)]
    for h in handles:
        check(h.can_multi_conn(), "CAN_MULTI_CONN is offered")
    block = 64 * KIB
    region = depth * block * 2
    expected = {}
    errors = []

    def run_all(h, submit):
        """Submits every request at once, then polls until all complete; returns the cookies."""
        cookies = [submit(i) for i in range(depth * 2)]
        check(h.aio_in_flight() > 1, "requests are in flight together")
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie in cookies:
            try:
                check(h.aio_command_completed(cookie), f"command {cookie} completed")
            except nbd.Error as error:
                raise Failed(f"command {cookie} failed: {error}") from error

    def writer(n):
        try:
            h = handles[n]
            base = n * region
            buffers = {}

            def submit(i):
                data = os.urandom(block)
                expected[base + i * block] = data
                buffers[i] = nbd.Buffer.from_bytearray(bytearray(data))
                return h.aio_pwrite(buffers[i], base + i * block)

            run_all(h, submit)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(f"writer {n}: {error!r}")

    in_threads(writer, connections)
    check(not errors, "; ".join(errors))

    # Every write has been replied to, so a FLUSH on any one connection covers them all.
    handles[0].flush()
    handles[-1].flush(nbd.CMD_FLAG_FUA)

    def reader(n):
        try:
            # Each connection reads back what another one wrote.
            h = handles[n]
            base = ((n + 1) % connections) * region
            buffers = {}

            def submit(i):
                buffers[i] = nbd.Buffer(block)
                return h.aio_pread(buffers[i], base + i * block)

            run_all(h, submit)
            for i, buf in buffers.items():
                if bytes(buf.to_bytearray()) != expected[base + i * block]:
                    errors.append(f"connection {n} read other bytes at {base + i * block}")
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(f"reader {n}: {error!r}")

    in_threads(reader, connections)
    check(not errors, "; ".join(errors[:10]))
    for h in handles:
        h.shutdown()
    print(f"{connections} connections, {depth * 2} requests in flight each, {len(expected)} blocks checked")


def interleaved(uri, connections="4", depth="128"):
    """Connections write neighbouring 4 KiB blocks at once, so every 64 KiB chunk of the storage
    is written by all of them concurrently (copy-on-write from the base, for an overlay)."""
    connections, depth = int(connections), int(depth)
    handles = [connect(uri) for _ in range(connections)]
    block = 4 * KIB
    expected = {}
    errors = []

    def writer(n):
        try:
            h = handles[n]
            cookies, buffers = [], []
            for k in range(depth):
                offset = (k * connections + n) * block + 512  # unaligned, straddling chunks too
                data = os.urandom(block)
                expected[offset] = data
                buffers.append(nbd.Buffer.from_bytearray(bytearray(data)))
                cookies.append(h.aio_pwrite(buffers[-1], offset))
            while h.aio_in_flight() > 0:
                h.poll(-1)
            for cookie in cookies:
                h.aio_command_completed(cookie)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(f"writer {n}: {error!r}")

    in_threads(writer, connections)
    check(not errors, "; ".join(errors))
    h = handles[0]
    h.flush()
    bad = [offset for offset, data in sorted(expected.items()) if bytes(h.pread(block, offset)) != data]
    check(not bad, f"{len(bad)} of {len(expected)} blocks read back other bytes, first at {bad[:5]}")
    print(f"{len(expected)} interleaved blocks checked")


# ---- latency -----------------------------------------------------------------------------------


def read_latency(uri, seconds, start_file=""):
    """Reads 4 KiB at a time, one request after the other, for `seconds`; prints one JSON line
    with the count and the 50th, 99th percentile and largest latency in milliseconds. Touches
    `start_file` once the first read is done, so the caller knows reads are under way."""
    import json
    import random
    import time

    h = connect(uri)
    size = h.get_size()
    rng = random.Random(7)
    latencies = []
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        offset = rng.randrange(0, size // (4 * KIB)) * 4 * KIB
        started = time.monotonic()
        h.pread(4 * KIB, offset)
        latencies.append((time.monotonic() - started) * 1000)
        if start_file and len(latencies) == 1:
            open(start_file, "w").close()
    latencies.sort()
    check(len(latencies) > 0, "no read finished")
    at = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(json.dumps({"reads": len(latencies), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": latencies[-1]}))


SCENARIOS = {
    "read-latency": read_latency,
    "out-of-range": out_of_range,
    "unknown-flags": unknown_flags,
    "fill": fill,
    "oversized": oversized,
    "largest": largest,
    "zero-length": zero_length,
    "read-only": read_only,
    "block-status": block_status,
    "df": df_reads,
    "fast-zero": fast_zero,
    "huge-zero": huge_zero,
    "options": options,
    "old-clients": old_clients,
    "multi-conn": multi_conn,
    "interleaved": interleaved,
}


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in SCENARIOS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SCENARIOS)}}} ARGS...")
    try:
        SCENARIOS[sys.argv[1]](*sys.argv[2:])
    except Failed as failure:
        sys.exit(f"{sys.argv[1]}: {failure}")


if __name__ == "__main__":
    main()
