"""The soak of issue 6, in its CI length (60 s; `make soak` runs 10 minutes)."""

import json
import os

from support.soak import soak


def test_soak(tmp_path):
    seconds = int(os.environ.get("SOAK_SECONDS", "60"))
    report, problems = soak(seconds, tmp_path)
    print(json.dumps(report, indent=1))
    assert not problems, (problems, report)
    assert report["pushes"] >= seconds // 30 - 1
