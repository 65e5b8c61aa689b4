"""ovmf-mh bench: side-by-side speed measurements."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from host_shim.devtools.bench import bench_crypto, bench_pipeline, format_pipeline_report, format_report
from host_shim.devtools.profile_reference import format_profile
from host_shim.errors import OvmfMhError
from host_shim.firmware.boot import resolve_image
from host_shim.migration.convergence import DEFAULT_DOWNTIME_LIMIT_MS, ConvergenceSettings
from host_shim.migration.migrate import SWITCHOVER_MODES
from host_shim.vm import process
from host_shim.vm.debian_vm import GUEST_KINDS


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser(
        "bench",
        help="side-by-side speed: page crypto, transfer pipeline, live migration, idle helpers",
        description=(
            "crypto: the host-built core (the firmware's C sources) against OpenSSL through "
            "pyca cryptography on the same 4 KiB pages in one run, as MB/s and ratios; then the "
            "firmware helper's export and import rate under QEMU TCG through the mailbox. "
            "pipeline: the reference-helper pipeline against raw AEAD and the helper alone, and "
            "1 against N firmware helpers, next to a plain copy of the same RAM file. "
            "migrate: plain QEMU migration of the test guest (or, --guest debian, the Debian VM with the TCP "
            "probe's numbers) against ovmf-mh, per guest size; ovmf-mh runs as two programs over loopback TCP (a "
            "migrate-incoming program as the target; the Debian guest's roles in one process). "
            "helper: a firmware helper's CPU use while idle and its wake latency, halting beside spinning; "
            "its export and import MB/s with and without the vector (VAES) path. "
            "suite: part of the test suite timed with the firmware helpers spinning and halting, alternating. "
            "All numbers are measured side by side in one run; the machine's load moves them."
        ),
    )
    bench_sub = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    crypto = bench_sub.add_parser("crypto", help="page crypto speed")
    crypto.add_argument("--pages", type=int, default=2048, help="pages per native run (default 2048)")
    crypto.add_argument("--rounds", type=int, default=5, help="timed repetitions, best counts (default 5)")
    crypto.add_argument("--guest-mib", type=int, default=64, help="guest RAM for the firmware run (default 64)")
    crypto.add_argument("--no-firmware", action="store_true", help="skip the QEMU run (default: run it)")
    crypto.add_argument("--image", help="firmware image (default: the DEBUG build)")
    crypto.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    crypto.set_defaults(handler=run_crypto)

    pipeline = bench_sub.add_parser("pipeline", help="transfer pipeline speed and helper scaling")
    pipeline.add_argument("--guest-mib", type=int, default=128, help="random guest RAM to move (default 128)")
    pipeline.add_argument("--helpers", type=int, default=2, help="N for the N-helper run (default 2)")
    pipeline.add_argument("--rounds", type=int, default=3,
                          help="alternating rounds of the 1- and N-helper runs, best counts (default 3)")
    pipeline.add_argument("--no-firmware", action="store_true",
                          help="reference pipeline only (default: also 1 and N firmware helpers)")
    pipeline.add_argument("--profile", action="store_true",
                          help="also time each step of the reference helper's per-page work (default: off)")
    pipeline.add_argument("--image", help="firmware image (default: the DEBUG build)")
    pipeline.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    pipeline.set_defaults(handler=run_pipeline)

    mig = bench_sub.add_parser("migrate", help="live migration: plain QEMU against ovmf-mh, size after size")
    mig.add_argument("--guest", choices=GUEST_KINDS, default="test",
                     help="the guest both migrate: the test guest (default) or 'debian', the Debian 12 disk the "
                     "firmware boots, with --vcpus vCPUs and virtio disk, NIC and RNG; each of its migrations "
                     "boots its own guest (1.5-3 min under TCG) and, as root, streams the TCP probe through it")
    mig.add_argument("--guest-mib", metavar="MIB[,MIB...]",
                     help="guest RAM sizes, comma-separated, e.g. 256,1024,4096,16384 (default 256; with --guest "
                     "debian 1024); a size ovmf-mh cannot migrate is a row that says why")
    mig.add_argument("--vcpus", type=int, default=2, help="with --guest debian: vCPUs, 1..8 (default 2)")
    mig.add_argument("--client-rto-max-ms", type=int, metavar="MS",
                     help="with --guest debian: cap the probe client's TCP retransmission backoff at MS "
                     "(net.ipv4.tcp_rto_max_ms in its namespace, 1000..120000, Linux 6.15+; default: the "
                     "kernel's 120000)")
    mig.add_argument("--no-verify-ram", action="store_true",
                     help="with --guest debian: skip ovmf-mh's comparison of the source and target RAM at "
                     "switchover (the guest is stopped during it, though it is not counted as downtime)")
    mig.add_argument("--workload-mib", type=int,
                     help="memory the guest's workload keeps rewriting, the same at every size (default 64; the "
                     "Debian guest's is fixed by its image)")
    mig.add_argument("--helpers", type=int, default=1, help="helpers per side for ovmf-mh (default 1)")
    mig.add_argument("--switchover", choices=SWITCHOVER_MODES, default="dirty-log",
                     help="ovmf-mh's switchover (see 'ovmf-mh migrate --help'; default dirty-log)")
    mig.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="ovmf-mh's peer may stay silent this long (default 60: a loaded machine slows the "
                     "target's last imports)")
    mig.add_argument("--image", help="firmware image (default: the DEBUG build)")
    mig.add_argument("--work-dir", type=Path,
                     help="folder for logs (default: a new temp folder, its RAM files removed at the end)")
    mig.add_argument("--ram-dir", type=Path,
                     help="RAM files of every run here for the run only, e.g. /dev/shm with --switchover "
                     "full-check (default: work folder)")
    mig.add_argument("--background-load", type=int, default=0, metavar="N",
                     help="run N busy processes beside every migration, plain QEMU and ovmf-mh alike (default 0)")
    mig.add_argument("--downtime-limit", type=float, default=DEFAULT_DOWNTIME_LIMIT_MS, metavar="MS",
                     help="ovmf-mh's downtime limit for the final pass (see 'ovmf-mh migrate --help'; default "
                     f"{DEFAULT_DOWNTIME_LIMIT_MS})")
    mig.add_argument("--auto-converge", action=argparse.BooleanOptionalAction, default=True,
                     help="ovmf-mh throttles the source guest while pre-copy does not converge (see 'ovmf-mh "
                     "migrate --help'; default on)")
    mig.add_argument("--plot", type=Path, metavar="FILE.png",
                     help="draw downtime and total time against guest size, plain beside ovmf-mh")
    mig.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    mig.set_defaults(handler=run_migrate)

    helper = bench_sub.add_parser(
        "helper", help="one firmware helper: idle CPU and wake latency, page crypto with and without vectors")
    helper.add_argument("--section", action="append", metavar="NAME",
                        help="run only this section (repeatable; default all: idle, crypto)")
    helper.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds over which idle CPU is measured (default 5)")
    helper.add_argument("--samples", type=int, default=100,
                        help="empty commands timed per helper for the wake latency (default 100)")
    helper.add_argument("--crypto-guest-mib", type=int, default=64,
                        help="random guest RAM each helper of section crypto exports and imports (default 64)")
    helper.add_argument("--crypto-rounds", type=int, default=3,
                        help="alternating rounds of both paths in section crypto, best counts (default 3)")
    helper.add_argument("--image", help="firmware image (default: the DEBUG build)")
    helper.add_argument("--compare-image", type=Path, metavar="IMAGE",
                        help="section idle also times this image's halting helper beside --image's, alternating, "
                             "e.g. an older build (default: none)")
    helper.add_argument("--work-dir", type=Path,
                        help="folder for logs, kept (default: a new temp folder, removed after a success, "
                             "kept and named after a failure)")
    helper.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    helper.set_defaults(handler=run_helper)

    suite = bench_sub.add_parser(
        "suite", help="part of the test suite timed with spinning helpers against halting ones, alternating")
    suite.add_argument("--tests", nargs="+", metavar="PATH",
                       help="pytest paths to time (default: the files that start the most firmware helpers: "
                            "tests/test_transfer.py tests/test_migration_protocol.py tests/test_faults.py)")
    suite.add_argument("--rounds", type=int, default=1,
                       help="rounds of one run per idle policy, the order alternating (default 1)")
    suite.add_argument("--work-dir", type=Path, help="folder for the runs' pytest logs (default: a new temp folder)")
    suite.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    suite.set_defaults(handler=run_suite)

    zero = bench_sub.add_parser("zero-ranges",
                                help="never-written memory: export page by page against zero ranges")
    zero.add_argument("--guest-mib", default="1024,2048",
                      help="guest sizes, comma separated (default 1024,2048)")
    zero.add_argument("--rounds", type=int, default=2,
                      help="alternating rounds of both exports, best counts (default 2)")
    zero.add_argument("--helpers", type=int, default=1, help="firmware helpers per export (default 1)")
    zero.add_argument("--image", help="firmware image (default: the DEBUG build)")
    zero.add_argument("--work-dir", type=Path, help="folder for logs and RAM files "
                      "(default: a new temp folder, removed after a success)")
    zero.add_argument("--json", action="store_true", help="print the results as JSON (default: text)")
    zero.set_defaults(handler=run_zero_ranges)


def run_crypto(args: argparse.Namespace) -> int:
    from pathlib import Path

    image = None if args.no_firmware else resolve_image(Path(args.image) if args.image else None)
    results = bench_crypto(pages=args.pages, rounds=args.rounds, firmware=image, guest_mib=args.guest_mib)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_report(results)))
    return 0


def run_pipeline(args: argparse.Namespace) -> int:
    from pathlib import Path

    image = None if args.no_firmware else resolve_image(Path(args.image) if args.image else None)
    results = bench_pipeline(guest_mib=args.guest_mib, helpers=args.helpers, firmware=image, rounds=args.rounds,
                             profile=args.profile)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_pipeline_report(results)))
        if "reference_profile_us_per_page" in results:
            print("\n".join(format_profile(results["reference_profile_us_per_page"])))
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from host_shim.devtools.bench_migrate import parse_sizes

    debian = args.guest == "debian"
    sizes = parse_sizes(args.guest_mib or ("1024" if debian else "256"))
    _check_guest_options(args)
    image = resolve_image(Path(args.image) if args.image else None)
    convergence = ConvergenceSettings(downtime_limit_ms=args.downtime_limit, auto_converge=args.auto_converge)
    with _work_folder(args.work_dir, "migrate", keep_logs=True) as work:
        return _bench_migrate_in(args, image, work, sizes, debian, convergence)


def _bench_migrate_in(args: argparse.Namespace, image: Path, work: Path, sizes: list[int], debian: bool,
                      convergence: ConvergenceSettings) -> int:
    from host_shim.devtools.bench_migrate import bench_migrate, format_table

    if debian:
        from host_shim.devtools.bench_migrate_debian import bench_migrate_debian, format_debian_table

        results = bench_migrate_debian(image, work, sizes=sizes, vcpus=args.vcpus, helpers=args.helpers,
                                       ram_dir=args.ram_dir, switchover=args.switchover,
                                       idle_timeout=args.idle_timeout, background_load=args.background_load,
                                       client_rto_max_ms=args.client_rto_max_ms,
                                       verify_ram=not args.no_verify_ram, convergence=convergence)
        table = format_debian_table(results)
    else:
        results = bench_migrate(image, work, sizes=sizes, workload_mib=args.workload_mib or 64,
                                helpers=args.helpers, ram_dir=args.ram_dir, switchover=args.switchover,
                                idle_timeout=args.idle_timeout, background_load=args.background_load,
                                convergence=convergence)
        table = format_table(results)
    (work / "bench.json").write_text(json.dumps(results, indent=2))
    if args.plot is not None:
        from host_shim.devtools.plots import plot_bench

        plot_bench(results, args.plot)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print("\n".join(table))
    print(f"logs in {work}" + (f"; drawn in {args.plot}" if args.plot else ""))
    return 0


def _check_guest_options(args: argparse.Namespace) -> None:
    """Options of one guest given with the other are refused, never ignored."""
    if args.guest == "debian":
        if args.workload_mib is not None:
            raise OvmfMhError("--workload-mib: the Debian guest's workload is fixed by its image "
                              "(host_shim/vm/guest_image.py); leave it out with --guest debian")
        from host_shim.devtools.bench_migrate_debian import check_vcpus

        check_vcpus(args.vcpus)
        return
    if args.vcpus != 2:
        raise OvmfMhError("--vcpus is the Debian guest's (--guest debian); the test guest has one vCPU")
    if args.client_rto_max_ms is not None:
        raise OvmfMhError("--client-rto-max-ms is the TCP probe's client (--guest debian); the test guest has no NIC")
    if args.no_verify_ram:
        raise OvmfMhError("--no-verify-ram goes with --guest debian; the test guest's bench reports its RAM check")


def run_helper(args: argparse.Namespace) -> int:
    from host_shim.devtools.bench_helper import BenchContext, bench_helper, format_helper_report

    image = resolve_image(Path(args.image) if args.image else None)
    with _work_folder(args.work_dir, "helper", keep_logs=False) as work:
        context = BenchContext(image=image, work=work, idle_seconds=args.idle_seconds, samples=args.samples,
                               crypto_guest_mib=args.crypto_guest_mib, crypto_rounds=args.crypto_rounds,
                               compare_image=resolve_image(args.compare_image) if args.compare_image else None)
        results = bench_helper(context, args.section)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print("\n".join(format_helper_report(results)))
            if args.work_dir is not None:
                print(f"logs in {work}")
    return 0


@contextmanager
def _work_folder(given: Path | None, bench: str, keep_logs: bool) -> Iterator[Path]:
    """The bench's work folder: ``given`` (--work-dir) is the user's and
    stays as it is. A folder the bench makes itself is the reaper's should
    the command be killed; its guests' RAM files (gigabytes, no logs) go
    when the bench ends; after a failure the folder is kept and named,
    after a success it is kept only with ``keep_logs`` (the bench prints
    where)."""
    if given is not None:
        yield given.resolve()
        return
    work = process.temp_dir(f"ovmf-mh-bench-{bench}-").resolve()
    try:
        yield work
    except BaseException:
        process.keep(work)
        _drop_ram_files(work)
        print(f"ovmf-mh: bench {bench} failed; logs kept in {work}", file=sys.stderr)
        raise
    if keep_logs:
        process.keep(work)
        _drop_ram_files(work)
    else:
        process.remove(work)


def _drop_ram_files(work: Path) -> None:
    for ram in work.rglob("*.ram"):
        ram.unlink(missing_ok=True)


def run_suite(args: argparse.Namespace) -> int:
    import tempfile

    from host_shim.devtools.bench_suite import DEFAULT_TESTS, bench_suite, format_suite

    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="ovmf-mh-bench-suite-"))).resolve()
    results = bench_suite(work, tests=args.tests or DEFAULT_TESTS, rounds=args.rounds)
    (work / "bench.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_suite(results)))
        print(f"pytest logs in {work}")
    return 0 if results["all_passed"] else 1


def run_zero_ranges(args: argparse.Namespace) -> int:
    from host_shim.devtools.bench_zero_ranges import bench_zero_ranges, format_zero_ranges

    image = resolve_image(Path(args.image) if args.image else None)
    sizes = [int(size) for size in args.guest_mib.split(",")]
    with _work_folder(args.work_dir, "zero", keep_logs=False) as work:
        work.mkdir(parents=True, exist_ok=True)
        results = bench_zero_ranges(image, work, sizes=sizes, rounds=args.rounds, helpers=args.helpers)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(format_zero_ranges(results)))
    return 0
