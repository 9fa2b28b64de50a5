"""libiscsi's conformance suite (iscsi-test-cu) over four LUN profiles, sgtarget beside tgt.

    python -m benchmarks.conformance [--no-tgt] [--logs DIR]

Each target is run in these profiles, a fresh process and a fresh sparse 256 MiB file each:

- ``thin``: thin-provisioned LUN without the UNMAP command (``unmap=0``: WRITE SAME with
  UNMAP deallocates) and 4 KiB physical blocks, ``ALL`` with ``--dataloss --allow-sanitize``;
- ``removable``: removable-medium LUN (thin too, with UNMAP) with 512-byte physical blocks,
  ``ALL`` with ``--dataloss``, and a second portal of the same target given as the multipath
  URL (the MultipathIO tests need it);
- ``readonly``: write-protected LUN (thin too: ReadOnlySBC also tries UNMAP), the suite about
  write protection plus those that only read (every other suite writes, and a write-protected
  LUN must refuse those writes);
- ``pi`` (sgtarget only: tgt has no protection information): the thin profile on a LUN
  formatted with T10 PI type 1 (``pi=1``), where every write generates tuples and every read
  checks them.

Each log is scored the way ``shared/tools/cu_score.py`` scores it (a test with "FAILED" anywhere
in its output failed, else with "SKIPPED" it was skipped, else with "passed" it passed), and the
profiles are combined: a test passed if it passed in some profile and failed in none, failed if
it failed in any. CUnit's own verdict is kept beside it. The two differ for the tests in
``LOG_ARTIFACTS``, whose "[FAILED]" lines are printed by libiscsi for a failure the test expects
or by a suite cleanup after the test has passed; they are listed by name with the reason.

Exit status 0 when, for sgtarget, no test is skipped in every profile, CUnit passed every test in
every profile, and every cu_score failure is one of ``LOG_ARTIFACTS``; 1 otherwise; 2 when a
tool is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import BenchError, SgTarget, TgtTarget, print_table, require

MiB = 1024 * 1024
LUN_SIZE = 256 * MiB
#: A full ALL run takes under a minute against sgtarget; tgt waits out timeouts in some tests.
RUN_TIMEOUT = 1200.0

#: Suites that only read, so a write-protected LUN must pass them as any other LUN does.
READONLY_SUITES = (
    "ALL.ReadOnly",
    "ALL.Inquiry",
    "ALL.TestUnitReady",
    "ALL.ReadCapacity10",
    "ALL.ReadCapacity16",
    "ALL.ModeSense6",
    "ALL.ReportSupportedOpcodes",
    "ALL.Read6",
    "ALL.Read10",
    "ALL.Read12",
    "ALL.Read16",
    "ALL.Verify10",
    "ALL.Verify12",
    "ALL.Verify16",
    "ALL.Prefetch10",
    "ALL.Prefetch16",
    "ALL.ReadDefectData10",
    "ALL.ReadDefectData12",
)


#: Physical block geometry and UNMAP (the ``physical_block_size=`` and ``unmap=`` LUN keys)
#: split between the thin and removable profiles, because libiscsi 1.19 cannot pass everything
#: on one LUN:
#:
#: - CompareAndWrite.InvalidDataOutSize, WriteSame10/16.InvalidDataOutSize and
#:   WriteSame10/16.UnmapUnaligned need LBPPB >= 2 (and a thin LUN): the default 4 KiB
#:   physical blocks (LBPPB 8), in the thin profile;
#: - GetLBAStatus.UnmapSingle (LBPU) is only right with LBPPB 1: its second loop unmaps LBAs
#:   0..i-1, asks GET LBA STATUS at LBA i+1 and wants the first descriptor at i+LBPPB, where
#:   SBC-4 5.8 puts it at the LBA asked for (i+1). ``physical_block_size=512``, in the
#:   removable profile;
#: - NoMedia.NoMediaSBC sends UNMAP to the ejected medium, and only on a removable LUN (on
#:   any other it returns at once, and is scored passed): without UNMAP it logs "[SKIPPED]
#:   UNMAP is not implemented" and that check would run nowhere. So the removable profile
#:   keeps UNMAP and the thin one is the profile without it (``unmap=0``: UnmapSingle skips
#:   there for lack of LBPU, Unmap.* log "[SKIPPED]" there, and all pass in the removable one).
#:
#: tgt's profiles stay as they were. It has no UNMAP switch; it has an (undocumented)
#: ``lbppbe`` parameter, but no GET LBA STATUS, so UnmapSingle skips on it whatever the
#: geometry, and LBPPB 1 in its removable profile would only skip the LBPPB>=2 tests there.
THIN_KEYS = "thin=1,unmap=0"
REMOVABLE_KEYS = "removable=1,thin=1,physical_block_size=512"


@dataclass(frozen=True)
class Profile:
    name: str
    #: Appended to sgtarget's ``--lun file:PATH,size=SIZE``.
    sg_keys: str
    #: tgtadm logical-unit ``--params`` for the same profile.
    tgt_params: str | None
    tests: tuple[str, ...]
    flags: tuple[str, ...]
    portals: int = 1
    #: False: sgtarget only (tgt has no such LUN, e.g. T10 PI).
    tgt: bool = True


PROFILES = (
    # The multipath URL goes with the removable profile, not with sanitize: with two paths,
    # libiscsi's Sanitize.Reservations takes RESERVE(6) on the second path's session and keeps
    # it (mpath_sd2_put neither releases nor logs out), so Sanitize.Reset's SANITIZE and TEST
    # UNIT READY then meet RESERVATION CONFLICT on any target that honours SPC-2 reservations.
    Profile("thin", THIN_KEYS, "thin_provisioning=1", ("ALL",), ("--dataloss", "--allow-sanitize")),
    Profile(
        "removable",
        REMOVABLE_KEYS,
        "removable=1,thin_provisioning=1",
        ("ALL",),
        ("--dataloss",),
        portals=2,
    ),
    Profile(
        "readonly",
        "readonly=1,thin=1",
        "readonly=1,thin_provisioning=1",
        READONLY_SUITES,
        ("--dataloss",),
    ),
    # The thin profile on a medium formatted with T10 PI type 1 (issue 6): every write
    # generates tuples, every read checks them. tgt has no PI.
    Profile(
        "pi",
        f"{THIN_KEYS},pi=1",
        None,
        ("ALL",),
        ("--dataloss", "--allow-sanitize"),
        tgt=False,
    ),
)

Verdict = str  # "passed" | "skipped" | "failed"

#: Tests whose log says "[FAILED]" although CUnit passes them on any target that behaves as the
#: standards say (tgt included): cu_score counts them failed. Each is excused only when CUnit
#: passed it and every "[FAILED]" line in its output matches its pattern.
_UA_DRAIN = (
    "drains the unit attention its own reset established for every I_T nexus (SAM-5 6.3: "
    "the nexus that asked for the reset included) with TEST UNIT READYs that expect GOOD; "
    "libiscsi's helper prints '[FAILED] TESTUNITREADY' for each one that meets it",
    r"\[FAILED\] TESTUNITREADY command failed with status 2 / sense key UNIT_ATTENTION\(0x06\)",
)
LOG_ARTIFACTS: dict[str, tuple[str, str]] = {
    "iSCSIdatasn.iSCSIDataSnInvalid": (
        "the test expects each WRITE with a bad DataSN to fail (CU_ASSERT_NOT_EQUAL(ret, 0)); "
        "libiscsi's write10() helper prints '[FAILED] WRITE10 command failed' for every "
        "failure it sees, expected or not",
        r"\[FAILED\] WRITE10 command failed with status 2 / sense key COMMAND ABORTED\(0x0b\)"
        r" / ASCQ \S+\(0x4b00\)",
    ),
    "Reserve6.LUNReset": (
        "printed after 'passed' by the Reserve6 suite's cleanup: its PERSISTENT RESERVE IN "
        "meets the BUS DEVICE RESET FUNCTION OCCURRED unit attention the test's LUN reset "
        "established for every I_T nexus (SAM-5 6.3), which nothing in the test clears",
        r"\[FAILED\] PRIN command: failed with sense\. SENSE KEY:UNIT_ATTENTION\(6\) "
        r"ASCQ:BUS_DEVICE_RESET_FUNCTION_OCCURED\(0x2903\)",
    ),
    "ModeSense6.Residuals": (
        "printed after 'passed' by the ModeSense6 suite's cleanup, on the second (multipath) "
        "path: its PERSISTENT RESERVE IN meets the MODE PARAMETERS CHANGED unit attention "
        "that ControlSwp's MODE SELECTs on the first path established for every other I_T "
        "nexus (SPC-5 6.11), which nothing in the suite clears",
        r"\[FAILED\] PRIN command: failed with sense\. SENSE KEY:UNIT_ATTENTION\(6\) "
        r"ASCQ:MODE PARAMETERS CHANGED\(0x2a01\)",
    ),
    "PreventAllow.LUNReset": _UA_DRAIN,
    "PreventAllow.WarmReset": _UA_DRAIN,
    "PreventAllow.ColdReset": _UA_DRAIN,
}

#: Tests CUnit fails on a target that answers as the standard says, because the test is wrong
#: for the LU's (valid) geometry: name -> (reason, pattern of the one assertion that may fail).
#: Excused only when that assertion is all that failed; they still count as failed in the
#: cu_score figures. Empty since GetLBAStatus.UnmapSingle runs where it is right (LBPPB 1, see
#: ``REMOVABLE_KEYS``).
KNOWN_TEST_BUGS: dict[str, tuple[str, str]] = {}


@dataclass
class CUnitSummary:
    ran: int = 0
    passed: int = 0
    failed: int = 0
    asserts_failed: int = 0


@dataclass
class ProfileResult:
    profile: Profile
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    #: Tests CUnit failed, or with a "[FAILED]" line that is not a known log artifact.
    real_failures: set[str] = field(default_factory=set)
    cunit: CUnitSummary = field(default_factory=CUnitSummary)
    logs: list[Path] = field(default_factory=list)
    error: str = ""

    def count(self, verdict: Verdict) -> int:
        return sum(1 for v in self.verdicts.values() if v == verdict)


#: CUnit's list of a failed test's assertions: "    1. file.c:123  - CU_ASSERT...".
_CUNIT_ASSERT = r"^\s+\d+\. \S+\.c:\d+\s+- "
#: CUnit's own failure report for a test: "FAILED" alone on a line, or an assertion line.
_CUNIT_FAILED = re.compile(rf"^FAILED\s*$|{_CUNIT_ASSERT}", re.M)


def _excused(test: str, body: str) -> bool:
    """Passed by CUnit with only allowed [FAILED] lines, or a known test bug and nothing else."""
    lines = body.splitlines()
    asserts = [x for x in lines if re.match(_CUNIT_ASSERT, x)]
    logged = [x for x in lines if "[FAILED]" in x and x not in asserts]
    if test in KNOWN_TEST_BUGS and asserts:
        bug = re.compile(KNOWN_TEST_BUGS[test][1])
        return all(bug.search(x) for x in asserts) and not logged
    if _CUNIT_FAILED.search(body) or "passed" not in body:
        return False
    if not logged:
        return True
    allowed = re.compile(LOG_ARTIFACTS[test][1]) if test in LOG_ARTIFACTS else None
    return allowed is not None and all(allowed.search(x) for x in logged)


def score_log(text: str) -> tuple[dict[str, Verdict], set[str]]:
    """Per ``Suite.Test``, the verdict by cu_score.py's rule (same splitting, same order), and
    the tests that failed beyond excuse: CUnit failed them, or a "[FAILED]" line in their
    output is not the pattern ``LOG_ARTIFACTS`` allows them."""
    verdicts: dict[str, Verdict] = {}
    real_failures: set[str] = set()
    for chunk in re.split(r"\nSuite: ", text)[1:]:
        suite = chunk.split("\n", 1)[0].strip()
        for t in re.split(r"\n\s*Test: ", chunk)[1:]:
            name = t.split(" ", 1)[0].strip().rstrip(".")
            body = t.split("\n  Test:")[0]
            if "FAILED" in body:
                verdict = "failed"
            elif "SKIPPED" in body:
                verdict = "skipped"
            elif "passed" in body:
                verdict = "passed"
            else:
                verdict = "failed"  # no verdict at all: the tool crashed or hung in the test
            test = f"{suite}.{name}"
            verdicts[test] = verdict
            if not _excused(test, body):
                real_failures.add(test)
    return verdicts, real_failures


def cunit_summary(text: str) -> CUnitSummary:
    tests = re.search(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", text, re.M)
    asserts = re.search(r"^\s+asserts\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+n/a\s*$", text, re.M)
    if tests is None or asserts is None:
        return CUnitSummary(failed=-1)  # no Run Summary: the tool died
    return CUnitSummary(
        ran=int(tests.group(2)),
        passed=int(tests.group(3)),
        failed=int(tests.group(4)),
        asserts_failed=int(asserts.group(4)),
    )


def combine(results: Sequence[ProfileResult]) -> dict[str, Verdict]:
    """Passed if passed in some profile and failed in none; failed if failed in any."""
    combined: dict[str, Verdict] = {}
    for result in results:
        for test, verdict in result.verdicts.items():
            before = combined.get(test)
            if before == "failed" or verdict == "failed":
                combined[test] = "failed"
            elif before == "passed" or verdict == "passed":
                combined[test] = "passed"
            else:
                combined[test] = "skipped"
    return combined


def run_cu(urls: Sequence[str], profile: Profile, logdir: Path, tag: str) -> ProfileResult:
    result = ProfileResult(profile)
    for i, test in enumerate(profile.tests):
        log = logdir / f"{tag}-{profile.name}-{i:02d}-{test}.log"
        argv = ["iscsi-test-cu", f"--test={test}", *profile.flags, *urls]
        with log.open("w") as out:
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            try:
                subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                result.error = f"{test}: iscsi-test-cu killed after {RUN_TIMEOUT:.0f} s"
        text = log.read_text(errors="replace")
        result.logs.append(log)
        verdicts, real_failures = score_log(text)
        result.verdicts.update(verdicts)
        result.real_failures |= real_failures
        summary = cunit_summary(text)
        if summary.failed < 0:
            result.error = result.error or f"{test}: no CUnit Run Summary (see {log})"
        else:
            result.cunit.ran += summary.ran
            result.cunit.passed += summary.passed
            result.cunit.failed += summary.failed
            result.cunit.asserts_failed += summary.asserts_failed
    return result


@contextlib.contextmanager
def _image(directory: Path, name: str) -> Iterator[Path]:
    path = directory / name
    with path.open("wb") as f:
        f.truncate(LUN_SIZE)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        for sidecar in directory.glob(f"{name}.*"):
            sidecar.unlink(missing_ok=True)


def run_sgtarget(profile: Profile, workdir: Path, logdir: Path) -> ProfileResult:
    with _image(workdir, f"sg-{profile.name}.img") as path:
        spec = f"file:{path},size={LUN_SIZE},{profile.sg_keys}"
        with SgTarget(spec, portals=profile.portals) as target:
            return run_cu(target.urls, profile, logdir, "sgtarget")


def run_tgt(profile: Profile, workdir: Path, logdir: Path) -> ProfileResult:
    if not profile.tgt:
        return ProfileResult(profile)  # nothing to compare: no verdicts, shown as n/a
    with (
        _image(workdir, f"tgt-{profile.name}.img") as path,
        TgtTarget(path, params=profile.tgt_params, portals=profile.portals) as target,
    ):
        return run_cu(target.urls, profile, logdir, "tgt")


def _score(verdicts: dict[str, Verdict]) -> str:
    values = list(verdicts.values())
    return "/".join(str(values.count(v)) for v in ("passed", "skipped", "failed"))


def report(name: str, results: Sequence[ProfileResult]) -> tuple[dict[str, Verdict], bool]:
    """Print what did not pass; returns the combined verdicts and whether the run is clean
    (nothing skipped everywhere, CUnit passed everything, cu_score failures only artifacts)."""
    combined = combine(results)
    real: set[str] = set().union(*(r.real_failures for r in results))
    failed = sorted(t for t, v in combined.items() if v == "failed")
    skipped = sorted(t for t, v in combined.items() if v == "skipped")
    print()
    for verdict, names in (("failed", failed), ("skipped", skipped)):
        if names:
            print(f"{name}: {len(names)} {verdict} (cu_score rule): {' '.join(names)}")
    clean = not any(r.error for r in results) and not real and not skipped
    for test in sorted(real):
        print(f"{name}: FAILED for real: {test}")
    for test in failed:
        if test not in real and test in LOG_ARTIFACTS:
            print(f"{name}: {test}: CUnit passed it; its [FAILED] lines: {LOG_ARTIFACTS[test][0]}")
        if test not in real and test in KNOWN_TEST_BUGS:
            print(f"{name}: {test}: a test bug: {KNOWN_TEST_BUGS[test][0]}")
    for r in results:
        if r.error:
            print(f"{name} {r.profile.name}: {r.error}")
    return combined, clean


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conformance", description=__doc__)
    ap.add_argument("--no-tgt", action="store_true", help="run sgtarget only")
    ap.add_argument("--logs", type=Path, help="keep the iscsi-test-cu logs in this directory")
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse LUN files live")
    ap.add_argument(
        "--profile",
        action="append",
        choices=[p.name for p in PROFILES],
        help="run only these profiles (default: all)",
    )
    args = ap.parse_args(argv)
    tools = ["iscsi-test-cu"] + ([] if args.no_tgt else ["tgtd", "tgtadm", "iscsi-ls"])
    require(*tools)
    profiles = [p for p in PROFILES if not args.profile or p.name in args.profile]

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        if args.logs:
            logdir = args.logs
            logdir.mkdir(parents=True, exist_ok=True)
        else:
            logdir = Path(tempfile.mkdtemp(prefix="sgtarget-conformance-"))
        runners = [("sgtarget", run_sgtarget)] + ([] if args.no_tgt else [("tgt", run_tgt)])
        results: dict[str, list[ProfileResult]] = {name: [] for name, _ in runners}
        try:
            for profile in profiles:
                for name, runner in runners:
                    print(f"running {name} / {profile.name} ...", flush=True)
                    results[name].append(runner(profile, work, logdir))
        except BenchError as e:
            print(f"conformance: {e}", file=sys.stderr)
            return 1

    rows: list[list[object]] = []
    for i, profile in enumerate(profiles):
        row: list[object] = [
            profile.name,
            " ".join(profile.tests[:1]) + (" ..." * (len(profile.tests) > 1)),
        ]
        for name, _ in runners:
            r = results[name][i]
            if not r.verdicts and not r.error:
                row += ["n/a", "", ""]
                continue
            row += [_score(r.verdicts), f"{r.cunit.passed}/{r.cunit.ran}", len(r.real_failures)]
        rows.append(row)
    reports = {name: report(name, rs) for name, rs in results.items()}
    combined = {name: verdicts for name, (verdicts, _) in reports.items()}
    row = ["combined", ""]
    for name, _ in runners:
        row += [
            _score(combined[name]),
            "",
            len(set().union(*(r.real_failures for r in results[name]))),
        ]
    rows.append(row)
    headers: list[str] = ["profile", "tests"]
    for name, _ in runners:
        headers += [f"{name} p/s/f", f"{name} CUnit", f"{name} real fail"]
    print_table(headers, rows, "iscsi-test-cu, scored as cu_score.py (passed/skipped/failed)")
    print(f"\nlogs: {logdir}")
    clean = reports["sgtarget"][1]
    print(f"sgtarget: {'CLEAN' if clean else 'NOT CLEAN'} (see the exit status rule in --help)")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
