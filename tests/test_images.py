"""sgmae_training/data/images.py: corrupt images are said where they are counted, so the warnings and the count of
skipped images agree."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT, tiny_config
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from sgmae_training.data.images import ImageCollator, warn_skipped

# Training stops after two of four batches (its last step) while a DataLoader worker has already decoded the
# batches after them: a corrupt image in the first two is counted, one in the last two never reaches training.
STOPPED_EARLY = """
import io, itertools, logging, time
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from sgmae_training.data.images import ImageCollator, warn_skipped

logging.basicConfig(format="%(levelname)s %(message)s")
buffer = io.BytesIO()
Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
rows = [{"image": {"bytes": buffer.getvalue(), "path": f"{index}.png"}} for index in range(8)]
rows[2] = {"image": {"bytes": b"not an image", "path": "used.jpg"}}
rows[6] = {"image": {"bytes": b"not an image", "path": "never-used.jpg"}}
loader = DataLoader(rows, batch_size=2, collate_fn=ImageCollator(pil_to_tensor, "image"), num_workers=1)
skipped = 0
for batch in itertools.islice(loader, 2):
    skipped += batch["skipped"]
    warn_skipped(batch)
    time.sleep(1)  # a training step, while the worker decodes ahead
print(skipped)
"""


def test_corrupt_images_are_warned_about_as_often_as_they_are_counted():
    result = subprocess.run(
        [sys.executable, "-c", STOPPED_EARLY], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING skipping a corrupt image")]
    assert int(result.stdout) == len(warnings) == 1
    assert "(used.jpg)" in warnings[0]


def test_an_image_of_other_bands_is_skipped_with_its_reason(caplog):
    rgb = Image.new("RGB", (8, 8))
    collate = ImageCollator(pil_to_tensor, "image", num_channels=tiny_config(num_channels=4).num_channels)
    batch = collate([{"image": rgb}, {"image": Image.new("RGBA", (8, 8))}])
    assert batch["skipped"] == 1 and not caplog.records  # nothing said while collating (maybe in a worker)
    warn_skipped(batch)
    assert [record.getMessage() for record in caplog.records] == [
        "skipping an image with 3 bands (no file name, mode RGB): the model takes 4 channels"
    ]
