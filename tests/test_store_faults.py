"""Store faults during `ocspmint run`: a file store on a real full disk (a
size- or inode-limited tmpfs mounted for the test), and S3 (SeaweedFS)
behind a proxy that resets connections or never answers a PUT, before or
after S3 stored the object. S3 5xx/SlowDown and single timeouts of the
S3Store itself are in test_s3store.py.

Every case: a serial whose object did not get stored is reported (stage
"store", naming its key), the run exits 1 without a traceback, the journal
has no row whose object is missing or differs, and a later run with the
fault gone publishes exactly what is left."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from e2e import issuer_id, ocspmint, run_json
from faultkit import assert_journal_matches_store, failed_serials, file_objects, journal_rows, verify_clean
from ocspmint.demo import Demo, build_demo
from ocspmint.model import serial_hex
from ocspmint.store import object_key
from s3proxy import FaultyS3
from seaweed import SeaweedS3

# --------------------------------------------------------------- file store: disk full

def run_cmd(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)}: {p.stdout}{p.stderr}"


def mount_options(path: Path, options: str) -> None:
    run_cmd("mount", "-o", f"remount,{options}", str(path))


@pytest.mark.parametrize("full,freed", [
    ("size=40k", "size=1m"),  # 10 pages: no block for the 11th response
    ("size=1m,nr_inodes=16", "nr_inodes=1000"),  # no inode for a shard folder or a file
], ids=["blocks", "inodes"])
def test_disk_full_reports_serials_keeps_journal_consistent_and_resumes(tmp_path, tmpfs, full, freed):
    demo = build_demo(tmp_path, certs=20, precerts=4, revoke=2)
    store = demo.root / "responses"
    tmpfs(store, full)
    p = ocspmint(demo, "run", "--quiet", "--json")
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert p.returncode == 1 and not summary["ok"]
    failed = failed_serials(summary, "store")
    assert len(failed) == len(summary["failures"]) > 0, summary["failures"][:3]
    assert summary["published"] > 0 and summary["published"] + len(failed) == 24
    for f in summary["failures"]:
        key = object_key(issuer_id(demo), int(f["serial"], 16))
        assert f["message"] == f"{store}/{key}: No space left on device", f
    objects = file_objects(demo)
    rows = assert_journal_matches_store(demo, objects.get)
    assert len(rows) == len(objects) == summary["published"]
    assert failed.isdisjoint(serial for _, serial in rows)
    assert not any((store / ".tmp").iterdir()), "a failed write left its temp file behind"
    assert verify_clean(demo) == summary["published"]

    mount_options(store, freed)
    code, again = run_json(demo)
    assert code == 0 and again["published"] == len(failed) and again["due"] == {"new": len(failed)}, again["failures"][:3]
    assert verify_clean(demo) == 24
    assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == 24


def test_write_back_error_on_a_thin_disk_fails_the_batch_and_a_later_run_publishes_it(tmp_path, tmpfs):
    """A thin-provisioned disk: an ext4 of 256 MB whose image lives on a
    tmpfs with no page to spare, so every write() succeeds into the page
    cache and the blocks fail only at write-back (EIO, then ext4 aborts its
    journal: read-only). The store's durability step (syncfs) must report
    it: the run fails every response, journals none, and once the disk has
    room again (fsck, mount) a second run publishes them all."""
    demo = build_demo(tmp_path, certs=20, precerts=4, revoke=2)
    backing, image, store = tmp_path / "backing", tmp_path / "backing" / "ext4.img", demo.root / "responses"
    tmpfs(backing, "size=64m")
    run_cmd("truncate", "-s", "256M", str(image))
    run_cmd("mkfs.ext4", "-q", "-F", str(image))
    store.mkdir()
    p = subprocess.run(["mount", "-o", "loop", str(image), str(store)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot loop-mount an image here: {p.stderr.strip()}")
    try:
        used = sum(f.stat().st_blocks for f in backing.iterdir()) * 512
        mount_options(backing, f"size={used}")  # the image may not grow by one page

        p = ocspmint(demo, "run", "--quiet", "--json")
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        summary = json.loads(p.stdout)
        assert p.returncode == 1 and not summary["ok"] and summary["published"] == 0, summary
        assert len(failed_serials(summary, "store")) == len(summary["failures"]) == 24
        written_back = {f["message"] for f in summary["failures"] if "write-back" in f["message"]}
        assert len(written_back) == 1, summary["failures"]  # the loop device passes ENOSPC up, or EIO on older kernels
        assert re.fullmatch(f"{store}: write-back failed, responses not durable: (No space left on device|Input/output error)",
                            written_back.pop())
        assert journal_rows(demo) == {}

        run_cmd("umount", str(store))
        mount_options(backing, "size=64m")
        subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)  # exit 1: errors corrected
        run_cmd("mount", "-o", "loop", str(image), str(store))
        code, again = run_json(demo)
        assert code == 0 and again["published"] == 24 and again["due"] == {"new": 24}, again["failures"][:3]
        assert verify_clean(demo) == 24
        assert len(assert_journal_matches_store(demo, file_objects(demo).get)) == 24
    finally:
        subprocess.run(["umount", "-l", str(store)], capture_output=True)


# --------------------------------------------------------------- S3: resets and PUTs that never return


def s3_demo(root: Path, sw: SeaweedS3, endpoint: str, prefix: str, retries: int = 2) -> tuple[Demo, Path]:
    """A demo (12 unexpired serials) publishing to ``s3://bucket/prefix``
    through ``endpoint`` with a 1 s request timeout and ``retries``; also
    returns a config that reaches SeaweedFS directly."""
    demo = build_demo(root, certs=10, precerts=2, revoke=1)
    text = demo.config.read_text()
    store = (f'url = "s3://{sw.bucket}/{prefix}"\nregion = "{sw.region}"\nretries = {retries}\ntimeout = "PT1S"\n'
             'concurrency = 8\nendpoint = ')
    assert text.count('url = "file:responses"') == 1
    demo.config.write_text(text.replace('url = "file:responses"', store + f'"{endpoint}"'))
    direct = root / "direct.toml"
    direct.write_text(text.replace('url = "file:responses"', store + f'"{sw.endpoint}"'))
    return demo, direct


def s3_reader(sw: SeaweedS3, prefix: str) -> Callable[[str], bytes | None]:
    """``read(key)``: the object's bytes straight from SeaweedFS, or None."""
    client = boto3.session.Session().client(
        "s3", endpoint_url=sw.endpoint, aws_access_key_id=sw.access_key, aws_secret_access_key=sw.secret_key,
        region_name=sw.region, config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def read(key: str) -> bytes | None:
        try:
            return client.get_object(Bucket=sw.bucket, Key=f"{prefix}/{key}")["Body"].read()
        except ClientError as e:
            if e.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise

    return read


@pytest.fixture
def proxies() -> Iterator[Callable[..., FaultyS3]]:
    made: list[FaultyS3] = []

    def make(target: str, fault) -> FaultyS3:
        made.append(FaultyS3(target, fault))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.mark.parametrize("mode", ["reset", "hang"])
def test_s3_first_put_of_every_other_object_faults_then_the_run_completes(tmp_path, seaweed, proxies, mode):
    seen: set[str] = set()

    def first_put_of_half(n: int, method: str, path: str) -> str | None:
        if method != "PUT" or path in seen:
            return None
        seen.add(path)
        return mode if len(seen) % 2 else None

    prefix = f"transient-{mode}"
    proxy = proxies(seaweed.endpoint, first_put_of_half)
    # 4 retries: a SeaweedFS that stalls past the 1 s timeout on a busy disk must not fail this test
    demo, direct = s3_demo(tmp_path, seaweed, proxy.endpoint, prefix, retries=4)
    code, summary = run_json(demo, env=seaweed.env())
    assert code == 0 and summary["ok"] and summary["published"] == 12, summary["failures"][:3]
    assert len(proxy.faults(mode)) == 6  # 12 objects: the first PUT of every other one
    assert len(assert_journal_matches_store(demo, s3_reader(seaweed, prefix))) == 12
    assert verify_clean(demo, env=seaweed.env(), config=direct) == 12


@pytest.mark.parametrize("mode", ["reset", "reset-after", "hang", "hang-after"])
def test_s3_puts_that_always_fail_are_reported_and_never_journaled(tmp_path, seaweed, proxies, mode):
    """Two objects never get an answer (``-after``: S3 stored them, the
    acknowledgement is lost): after 3 attempts their serials fail, the rest
    is published, and a run straight to S3 finishes the two."""
    prefix = f"always-{mode}"
    victims: set[str] = set()
    proxy = proxies(seaweed.endpoint, lambda n, method, path: mode if method == "PUT" and path.rsplit("/", 1)[-1] in victims else None)
    demo, direct = s3_demo(tmp_path, seaweed, proxy.endpoint, prefix)
    chosen = sorted(demo.serials["good"])[:2]
    victims.update(serial_hex(s) for s in chosen)
    p = ocspmint(demo, "run", "--quiet", "--json", env=seaweed.env())
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert p.returncode == 1 and summary["published"] == 10
    assert failed_serials(summary, "store") == set(chosen) and len(summary["failures"]) == 2
    for f in summary["failures"]:
        where = f"s3://{seaweed.bucket}/{prefix}/{object_key(issuer_id(demo), int(f['serial'], 16))}"
        assert f["message"].startswith(f"{where}: PUT failed after 3 attempts: "), f["message"]
    assert len(proxy.faults(mode)) == 2 * 3
    read = s3_reader(seaweed, prefix)
    rows = assert_journal_matches_store(demo, read)
    assert len(rows) == 10 and set(chosen).isdisjoint(s for _, s in rows)
    stored = {s for s in chosen if read(object_key(issuer_id(demo), s)) is not None}
    assert stored == (set(chosen) if mode.endswith("-after") else set())  # stored but not journaled: safe
    code, again = run_json(demo, env=seaweed.env(), config=direct)
    assert code == 0 and again["due"] == {"new": 2} and again["published"] == 2
    assert len(journal_rows(demo)) == 12
    assert len(assert_journal_matches_store(demo, read)) == 12
    assert verify_clean(demo, env=seaweed.env(), config=direct) == 12
