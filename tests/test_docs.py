"""The README documents every setting, so the docs cannot drift from the code."""

from __future__ import annotations

from packages import ROOT

from producer.settings import ProducerSettings
from worker.settings import WorkerSettings


def test_every_setting_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    names = {f"KILN_{name.upper()}" for cls in (WorkerSettings, ProducerSettings) for name in cls.model_fields}
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert not missing, f"README.md does not document {missing}"


def test_producer_side_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, producer, producer.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
