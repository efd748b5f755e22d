"""The omnisync command line: help, exit codes, one clear line on stderr for bad input."""

from __future__ import annotations

import subprocess
import sys

from omnisync_core.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "doctor" in out and "audio-info" in out


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "omnisync_core.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "audio-info" in result.stdout


def test_audio_info_reports_frames(speech_wav, capsys):
    assert main(["audio-info", str(speech_wav), "--fps", "29.97"]) == 0
    out = capsys.readouterr().out
    assert "video frames" in out and "22050 Hz" in out


def test_bad_audio_is_one_line_on_stderr(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert main(["audio-info", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0]
    assert main(["audio-info", str(tmp_path / "none.wav"), "--fps", "0"]) == 2
    assert "not found" in capsys.readouterr().err
