"""EditReward: a Qwen3.5 vision-language reward model of instruction edits (pairwise or pointwise), its
differentiable image path, Bradley-Terry-with-ties training, toy preference pairs, and `reward_loss` for DMDR.

    from rtedit.train.reward import EditReward, reward_loss
    reward = EditReward.from_pretrained("runs/reward-toy-pairwise/export", device="cuda")
    loss = reward_loss(reward, candidates, sources, instructions, baselines)   # candidates: pixels in [0, 1]

Submodules: model (EditReward, configs, export), images (resize/normalise/patchify in torch), loss, pairs (toy
pairs, Parquet, batches), task (the training task of jobs.train_reward), evaluate (accuracy, pixel steps).
"""

from rtedit.train.reward.loss import bt_ties_loss, reward_loss
from rtedit.train.reward.model import EditReward, RewardConfig

__all__ = ["EditReward", "RewardConfig", "bt_ties_loss", "reward_loss"]
