"""Installing a checkpoint restored from elsewhere (Ray storage) into a run directory."""

import json

from dsparse.runs.checkpoints import LATEST, STATE_FILE, latest_checkpoint, tag_of
from dsparse.train.checkpoint import install_checkpoint


def fake_checkpoint(path, step):
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights of step %d" % step)
    return path


def test_a_newer_checkpoint_is_installed_and_becomes_latest(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    installed = install_checkpoint(fake_checkpoint(tmp_path / "ray" / "checkpoint_a", 20), directory)
    assert installed == directory / tag_of(20) and latest_checkpoint(directory) == installed
    assert (installed / "mp_rank_00_model_states.pt").read_bytes() == b"weights of step 20"
    assert not list(directory.glob(".restore-*")), "the staging copy must be renamed, not left behind"


def test_an_older_or_equal_checkpoint_changes_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    install_checkpoint(fake_checkpoint(tmp_path / "new", 30), directory)
    assert install_checkpoint(fake_checkpoint(tmp_path / "old", 10), directory) is None
    assert install_checkpoint(fake_checkpoint(tmp_path / "same", 30), directory) is None
    assert (directory / LATEST).read_text() == tag_of(30) and not (directory / tag_of(10)).exists()
