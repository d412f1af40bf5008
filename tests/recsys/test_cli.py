"""The `recsys` command line as a user meets it: a summary on success, one line on mistakes."""

from __future__ import annotations

import subprocess
import sys

from recsys.cli import main


def test_import_reports_landing_and_pending_rejects(tmp_path, capsys):
    f = tmp_path / "ev.csv"
    f.write_text(
        "user_id,item_id,event_type,timestamp\nu1,i1,view,1761955200\nu2,i2,teleport,1761955200\n"
    )
    assert main(["--data-root", str(tmp_path / "d"), "import", "events", str(f)]) == 0
    out = capsys.readouterr().out
    assert (
        "2 events rows" in out
        and "1 rows will be rejected at ingest (unknown_event_type: 1)" in out
    )
    assert main(["--data-root", str(tmp_path / "d"), "import", "events", str(f)]) == 0
    assert "already landed" in capsys.readouterr().out

    # once ingested (moved out of landing), importing it again says so and lands nothing
    from recsys import ingest
    from recsys.storage import Storage

    storage = Storage(str(tmp_path / "d"))
    assert ingest.ingest_events(storage, "default").rows_new == 1
    assert main(["--data-root", str(tmp_path / "d"), "import", "events", str(f)]) == 0
    out = capsys.readouterr().out
    assert "have been ingested since; nothing landed" in out, out
    assert "will be rejected" not in out and "ingests it" not in out
    assert storage.landing_files("default", "events") == []


def test_user_mistakes_exit_2_with_one_line_and_no_traceback(tmp_path, capsys):
    root = ["--data-root", str(tmp_path / "d")]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    cases = [
        (["import", "events", str(tmp_path / "missing.csv")], "no such file"),
        (["import", "events", str(empty)], "is empty"),
        (["import", "events", str(empty.with_suffix(".xml"))], "no such file"),
        (["import", "users", str(empty), "--adapter", "taobao"], "has no users mapping"),
        (["demo-data", "--events", "0"], "--events must be positive"),
    ]
    (tmp_path / "x.xml").write_text("<a/>")
    cases.append((["import", "events", str(tmp_path / "x.xml")], "cannot tell the format"))
    for argv, message in cases:
        assert main(root + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_entry_point_runs_as_installed(tmp_path):
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"\xff\xfe not json\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys.cli",
            "--data-root",
            str(tmp_path / "d"),
            "import",
            "events",
            str(bad),
        ],
        capture_output=True,
        text=True,
    )
    # every line is bad: nothing to land, and the user is told why in one line
    assert proc.returncode == 2, proc.stderr
    assert "every line was rejected (bad_encoding: 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_data_prints_a_summary_and_is_idempotent(tmp_path, capsys):
    argv = [
        "--data-root",
        str(tmp_path / "d"),
        "demo-data",
        "--events",
        "3000",
        "--end-date",
        "2026-11-01",
    ]
    assert main(argv) == 0
    assert "wrote 3,0" in capsys.readouterr().out
    assert main(argv) == 0
    assert "already in landing/default/" in capsys.readouterr().out


def test_import_takes_the_event_types_the_tenant_declared(tmp_path, capsys):
    """`recsys import`'s dry run counts a type the tenant's config declares as the ingest will:
    valid, where another tenant's rows of it will be rejected."""
    from serving.documents import TenantDocuments

    root = tmp_path / "d"
    TenantDocuments(str(root / "serving")).collection("config").put(
        "acme", "config", {"event_types": {"wishlist": 2.0}}
    )
    f = tmp_path / "ev.csv"
    f.write_text("user_id,item_id,event_type,timestamp\nu1,i1,wishlist,1761955200\n")
    assert main(["--data-root", str(root), "import", "events", str(f), "--tenant", "acme"]) == 0
    assert "will be rejected" not in capsys.readouterr().out
    assert main(["--data-root", str(root), "import", "events", str(f), "--tenant", "globex"]) == 0
    assert "1 rows will be rejected at ingest (unknown_event_type: 1)" in capsys.readouterr().out
