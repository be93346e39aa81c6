"""DINO building blocks: head, loss + centre, EMA teacher, schedules, multi-crop forward."""
from ssl_xcit.dino.ema import copy_student_to_teacher, unwrap, update_teacher
from ssl_xcit.dino.head import DINOHead, cancel_last_layer_gradients, last_layer_parameters
from ssl_xcit.dino.loss import DINOLoss, teacher_stats, teacher_temperature
from ssl_xcit.dino.multicrop import MultiCropForward, resolution_runs
from ssl_xcit.dino.optim import param_groups_for_weight_decay
from ssl_xcit.dino.schedules import cosine_schedule, teacher_momentum_schedule

__all__ = [
    "DINOHead", "DINOLoss", "MultiCropForward", "cancel_last_layer_gradients", "copy_student_to_teacher",
    "cosine_schedule", "last_layer_parameters", "param_groups_for_weight_decay", "resolution_runs",
    "teacher_momentum_schedule", "teacher_stats", "teacher_temperature", "unwrap", "update_teacher",
]
