"""run_job keeps what is finished whatever stops it: a second Ctrl-C, a bug in a front end's
callback, a server that dies (issue 15: 4), with a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hostile
import pytest

from geochat_qgis.cli import main
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.pipeline import Job, run_job
from geochat_qgis.core.tiling import TileSpec

BOXES = "<p>car</p> {<10><10><40><40>|<0>}"


def _run(server, data_dir, on_progress, **job):
    backend = OpenAIHttpBackend("geochat", settings=HttpSettings(base_url=server.url,
                                                                  max_in_flight=1, retries=0))
    with backend:
        return run_job(Job(raster=str(data_dir / "RGB.byte.tif"), prompts=["car"],
                           tile_spec=TileSpec(tile_size=256, overlap=0), **job),
                       backend, on_progress=on_progress)


class StopAfter:
    """A progress callback that raises ``error`` at its ``n``-th call."""

    def __init__(self, n: int, error: BaseException) -> None:
        self.n, self.error, self.calls = n, error, 0

    def __call__(self, progress) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise self.error


def test_an_interrupt_mid_run_returns_the_finished_tiles(data_dir):
    with hostile.HostileServer("ok", text=BOXES) as server:
        result = _run(server, data_dir, StopAfter(3, KeyboardInterrupt()))
    assert result.cancelled and result.tiles_done == 3 and len(result.detections) == 3


def test_a_bug_in_a_callback_is_said_and_the_finished_tiles_kept(data_dir, caplog):
    with hostile.HostileServer("ok", text=BOXES) as server:
        result = _run(server, data_dir, StopAfter(2, ZeroDivisionError("division by zero")))
    assert not result.complete and result.tiles_done == 2 and len(result.detections) == 2
    assert "internal error (ZeroDivisionError" in result.error and "bug" in result.error
    assert isinstance(result.fault, ZeroDivisionError)
    assert "Traceback" in caplog.text  # logged with its traceback, not hidden


def test_an_unknown_output_crs_fails_before_any_request(data_dir):
    from geochat_qgis.core.errors import RasterError

    with hostile.HostileServer("ok", text=BOXES) as server:
        with pytest.raises(RasterError, match="output CRS 'EPSG:999999'"):
            _run(server, data_dir, None, output_crs="EPSG:999999")
        assert server.requests == 0


def test_ask_against_a_cut_body_says_so(data_dir, capsys):
    with hostile.HostileServer("cut-length", text="a long answer " * 20) as server:
        code = main(["ask", str(data_dir / "RGB.byte.tif"), "--model", "geochat",
                     "--server-url", server.url, "--prompt", "what is here?"])
    err = capsys.readouterr().err
    assert code == 1 and "cut off" in err and "Traceback" not in err
