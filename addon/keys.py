"""mitmproxy script entry point: `mitmdump -s addon/keys.py` loads the mitmkeys addons."""

import pathlib
import sys

# mitmproxy puts only this file's folder on sys.path while loading it. The addon package is
# imported from the repository root, so a checkout runs without being installed.
_REPOSITORY_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _REPOSITORY_ROOT not in sys.path:
    sys.path.insert(0, _REPOSITORY_ROOT)

from addon.apiserver import ApiListener  # noqa: E402
from addon.metering import UsageMeter  # noqa: E402
from addon.proxy import KeyEnforcer  # noqa: E402
from addon.recorder import UsageRecorder  # noqa: E402
from addon.settings import Settings  # noqa: E402

_settings = Settings()
_recorder = UsageRecorder(_settings)

# Order matters. API calls are claimed before key checks run. The meter records a request
# after the enforcer has decided on it. At shutdown the meter hands over interrupted
# requests before the recorder writes its last batch, and Settings closes the store last.
addons = [ApiListener(_settings), KeyEnforcer(_settings), UsageMeter(_recorder), _recorder, _settings]
