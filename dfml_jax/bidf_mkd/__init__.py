"""BiDf-MKD: black-box data-free meta-learning from a pool of APIs (Hu et al., ICML 2023)."""
from .inversion import (InversionConfig, InversionResult, image_prior, inversion_queries,
                        make_inverter, per_sample_objective)
from .metastep import KDTask, MetaSteps, ReplayTasks, kd_task_loss, make_meta_steps, replay_loss
