"""Training: `from fcn_tf import training; training.train(config, workdir)`.

agreement.py workers that agree before the first step (one all-gather; the chief's resume step)
recipe.py    the reference recipe on the replicas a run has: train steps from epochs, the LR rule
step.py      the distributed train step and the per-worker iterator that feeds it
resume.py    what a step saves (model checkpoint, each worker's input position), the resume point
recovery.py  the newest readable checkpoint: unreadable ones set aside, the state file repaired
workdir.py   the workdir lock and config.json
preemption.py  SIGTERM caught on every platform; all workers save the same step
settings.py  process-wide settings made before the model is built (TF32, XLA + SyncBN check)
init_checkpoint.py  fine-tuning: a new run starts from another model's matching weights
loop.py      the controller: train(), checkpoints, summaries, evaluation, preemption, non-finite stop
"""

from fcn_tf.training.init_checkpoint import InitCheckpointError, InitReport, initialize
from fcn_tf.training.loop import NonFiniteLossError, load_pretrained, train
from fcn_tf.training.preemption import PREEMPTED_EXIT_CODE, Preempted
from fcn_tf.training.resume import input_dir, resume_step
from fcn_tf.training.settings import apply_training_settings
from fcn_tf.training.step import TrainStep, make_train_iterator, make_train_step
from fcn_tf.training.workdir import WorkdirLockedError, workdir_lock, write_config

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "InitCheckpointError",
    "InitReport",
    "NonFiniteLossError",
    "Preempted",
    "TrainStep",
    "WorkdirLockedError",
    "apply_training_settings",
    "initialize",
    "input_dir",
    "load_pretrained",
    "make_train_iterator",
    "make_train_step",
    "resume_step",
    "train",
    "workdir_lock",
    "write_config",
]
