"""fcn_tf.runtime: settings made before TensorFlow is imported."""

import os
import subprocess
import sys

from fcn_tf.runtime import prefer_onednn


def test_prefer_onednn_sets_a_default_and_keeps_the_users_choice(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_runtime_module_does_not_import_tensorflow():
    # The scripts call prefer_onednn() first; importing it must not load TensorFlow,
    # which reads the variable once, at import.
    code = "import sys, fcn_tf.runtime; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
