"""End to end: the addon survives mitmproxy reloading its script while requests keep working."""

import shutil
import time

import pytest

from tests import e2e_support
from tests.e2e_support import Mitmdump, proxy_session


@pytest.fixture
def copied_addon(tmp_path, monkeypatch):
    """A copy of the addon package that the test may touch to make mitmproxy reload it."""
    package = tmp_path / "checkout" / "addon"
    shutil.copytree(e2e_support.REPOSITORY_ROOT / "addon", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(e2e_support, "ADDON_SCRIPT", package / "keys.py")
    return package


def test_script_reload_keeps_serving(copied_addon, tmp_path, upstream):
    process = Mitmdump(tmp_path, tmp_path / "keys.db").start()
    try:
        api = process.api()
        service = api.create_service(upstream.base_url)
        key = api.create_key(service.name)

        script = copied_addon / "keys.py"
        script.write_text(script.read_text() + "\n# touched by the reload test\n")
        deadline = time.monotonic() + 20
        while process.log_text().count("mitmkeys management API:") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

        assert process.log_text().count("mitmkeys management API:") == 2
        assert api.call("GET", "/v1/keys").status_code == 200
        with proxy_session(process) as session:
            response = session.get(upstream.base_url + "/after-reload", headers={"X-Virtual-Key": key.secret}, timeout=10)
        assert response.status_code == 200
        assert "Traceback" not in process.log_text()
    finally:
        process.stop()
