"""Fine-tuning augmentation (``--augment``): what each level does to a batch, and distillation on the very
batch the student sees."""

from __future__ import annotations

import torch
from torch import nn

from compressor.data import LoadedData
from compressor.finetune import Cycle, FinetuneSettings


def _data(n: int = 12, size: int = 8) -> LoadedData:
    g = torch.Generator().manual_seed(0)
    return LoadedData.from_tensors(torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 3)


def test_none_gives_the_stored_batch_in_order():
    data = _data()
    x, y, idx = next(data.loader("train", batch_size=5))
    torch.testing.assert_close(x, data.train.x[:5])
    assert idx.tolist() == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 2, 0, 1]


def test_light_crops_and_flips_each_image_on_its_own():
    torch.manual_seed(0)
    data = _data(n=64)
    x, y, idx = next(data.loader("train", batch_size=64, augment="light"))
    assert x.shape == data.train.x.shape and y.tolist() == data.train.y.tolist()
    shifted = flipped = 0
    for out, src in zip(x, data.train.x):
        padded = nn.functional.pad(src, (1, 1, 1, 1))  # an eighth of 8 px
        windows = {(dy, dx, f): padded[:, dy:dy + 8, dx:dx + 8].flip(2) if f else padded[:, dy:dy + 8, dx:dx + 8]
                   for dy in range(3) for dx in range(3) for f in (0, 1)}
        match = [k for k, w in windows.items() if torch.equal(w, out)]
        assert match, "every output is a window of the padded image, mirrored or not"
        shifted += match[0][:2] != (1, 1)
        flipped += match[0][2]
    assert 10 < flipped < 54 and shifted > 30  # per-image draws, not one for the whole batch


def test_strong_mixes_labels_into_probabilities():
    torch.manual_seed(0)
    data = _data(n=16)
    x, y, _ = next(data.loader("train", batch_size=8, augment="strong"))
    assert x.shape == (8, 1, 8, 8) and y.shape == (8, 3)
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert (y.max(1).values < 1).any()


class Recorder(nn.Module):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen
        self.lin = nn.Linear(64, 3)

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def _settings(augment: str) -> FinetuneSettings:
    return FinetuneSettings(epochs=1, batch_size=4, lr=0.01, optimizer="sgd", weight_decay=0.0, distill=True,
                            temperature=4.0, alpha=0.7, seed=0, augment=augment)


def test_the_teacher_sees_the_augmented_batch_the_student_sees():
    torch.manual_seed(0)
    student_seen, teacher_seen = [], []
    data = _data()
    cycle = Cycle(Recorder(student_seen), data, _settings("light"), teacher=Recorder(teacher_seen),
                  device=torch.device("cpu"))
    cycle.run()
    training = student_seen[: len(teacher_seen)]  # then the student's validation passes
    assert len(teacher_seen) == 3 and all(torch.equal(s, t) for s, t in zip(training, teacher_seen))
    assert not any(torch.equal(s, data.train.x[:4]) for s in training)  # augmented, not the stored images


def test_without_augmentation_the_teachers_logits_are_computed_once():
    seen: list = []
    cycle = Cycle(Recorder([]), _data(), _settings("none"), teacher=Recorder(seen), device=torch.device("cpu"))
    assert cycle.soft is not None and cycle.soft.shape == (12, 3)
    calls = len(seen)
    cycle.run()
    assert len(seen) == calls  # cached: the teacher does not run again during training
