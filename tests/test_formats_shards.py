"""WebDataset shards and COCO / Flickr30k caption corpora read from real files (the digits fixture)."""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from digits import NAMES
from shieldbench.data.formats.karpathy import read_captions_corpus
from shieldbench.data.formats.webdataset import ShardImages, read_shards
from shieldbench.data.images import decode_image
from shieldbench.errors import UserError

SIZE = 32
SAMPLE = [0, 1, 7, 718, 719, 720, 1000, 1437]  # both shards and the boundary between them


@pytest.fixture(scope="module")
def train_csv(digits) -> pd.DataFrame:
    return pd.read_csv(digits.train_csv, sep="\t")


@pytest.fixture(scope="module")
def shards(digits):
    return read_shards(digits.shards, SIZE, 0)


def png(digits, rel: str) -> torch.Tensor:
    return decode_image(digits.root / rel, SIZE, rel)


def shard_paths(digits) -> list[Path]:
    return sorted((digits.root / "shards").glob("shard-*.tar"))


# -- WebDataset shards -------------------------------------------------------------------------
def test_shards_match_csv_captions_and_pixels(digits, shards, train_csv):
    assert len(shards) == digits.n_train == len(train_csv)
    assert shards.captions == train_csv["title"].tolist()
    assert isinstance(shards.images, ShardImages) and shards.images.n_incomplete == 0
    assert shards.images.shape == (digits.n_train, 3, SIZE, SIZE)
    for i in SAMPLE:
        assert torch.equal(shards.images[i], png(digits, train_csv["filepath"][i])), i


def test_shards_row_order_ids_and_describe(digits, shards):
    paths = shard_paths(digits)
    # Keys are the sample index (zero padded), so shard order then tar order gives 0..n-1.
    assert shards.ids == [f"{i:09d}" for i in range(digits.n_train)]
    with tarfile.open(paths[0]) as tar:
        n_first = len({m.name.split(".")[0] for m in tar})
    img = shards.images
    assert img.shard.tolist() == [0] * n_first + [1] * (digits.n_train - n_first)
    assert img.describe(n_first) == f"{paths[1]}:{n_first:09d}"
    fp = img.fingerprint()
    assert fp["shards"] == [p.name for p in paths] and fp["bytes"] == [p.stat().st_size for p in paths]
    assert fp["n"] == digits.n_train


def test_shards_batch_index(shards):
    batch = shards.images[torch.tensor([3, 900])]
    assert batch.shape == (2, 3, SIZE, SIZE) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], shards.images[900])


def test_shards_max_rows(digits, shards):
    few = read_shards(digits.shards, SIZE, 5)
    assert len(few) == 5 and few.captions == shards.captions[:5]
    # A cap inside the first shard does not index the second.
    assert few.images.shards.tolist() == [str(shard_paths(digits)[0])]
    many = read_shards(digits.shards, SIZE, 1000)
    assert len(many) == 1000 and many.captions == shards.captions[:1000]
    assert torch.equal(many.images[999], shards.images[999])


def test_brace_expansion_and_single_shard(digits, shards):
    paths = shard_paths(digits)
    second = read_shards(str(paths[1]), SIZE, 0)
    n_first = len(shards) - len(second)
    assert second.captions == shards.captions[n_first:]
    both = read_shards(f"{digits.root}/shards/shard-00000{{0,1}}.tar", SIZE, 0)
    assert both.captions == shards.captions


def test_missing_shard(digits, tmp_path):
    with pytest.raises(UserError, match="shard-000002.tar"):
        read_shards(f"{digits.root}/shards/shard-{{000000..000002}}.tar", SIZE, 0)
    with pytest.raises(UserError, match="nothing.tar"):
        read_shards(str(tmp_path / "nothing.tar"), SIZE, 0)


@pytest.mark.parametrize("where", [0.5, 0.3, 0.0004])
def test_truncated_shard(digits, tmp_path, where):
    src = shard_paths(digits)
    bad = tmp_path / "bad-000001.tar"
    data = src[1].read_bytes()
    bad.write_bytes(data[: int(len(data) * where)])
    shutil.copy(src[0], tmp_path / "bad-000000.tar")
    with pytest.raises(UserError, match=r"truncated or corrupt shard .*bad-000001\.tar") as info:
        read_shards(str(tmp_path / "bad-{000000..000001}.tar"), SIZE, 0)
    assert "\n" not in str(info.value)


def test_incomplete_samples_skipped(tmp_path):
    import io

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "a.jpg", buf.getvalue())
        add(tar, "a.txt", b" a red square \n")
        add(tar, "b.txt", b"caption without image")
        add(tar, "c.jpg", buf.getvalue())  # image without caption
        add(tar, "d.json", b"{}")
        add(tar, "sub/e.webp.jpg", buf.getvalue())  # key "sub/e", ext "webp.jpg": not an image ext
        add(tar, "f.JPG", buf.getvalue())
        add(tar, "f.txt", b"upper-case extension")
    ps = read_shards(str(tmp_path / "s.tar"), SIZE, 0)
    assert ps.ids == ["a", "f"] and ps.captions == ["a red square", "upper-case extension"]
    assert ps.images.n_incomplete == 4  # b, c, d and sub/e lack an image or a caption
    assert ps.images[0].shape == (3, SIZE, SIZE)


def test_shard_images_pickle_round_trip(digits, shards):
    img = shards.images
    before = img[720]  # opens a descriptor, which must not travel
    copy = pickle.loads(pickle.dumps(img))
    assert copy._fds == {} and len(copy) == len(img)
    assert torch.equal(copy[720], before)
    assert copy.describe(3) == img.describe(3)


# -- COCO / Flickr30k ---------------------------------------------------------------------
def labels_of(digits, train_csv, rows: list[int]) -> list[int]:
    """The digit label of train rows: every caption names its digit."""
    out = []
    for i in rows:
        words = train_csv["title"][i].rstrip(".").split()
        out.append(next(NAMES.index(w) for w in words if w in NAMES))
    return out


def check_train(digits, train, train_csv) -> None:
    assert len(train) == digits.n_train
    assert train.captions == train_csv["title"].tolist()
    for i in (0, 719, 1437):
        assert torch.equal(train.images[i], png(digits, train_csv["filepath"][i])), i


def check_retrieval(digits, retrieval) -> None:
    assert len(retrieval) == digits.n_test == 359
    assert len(retrieval.captions) == 5 * 359
    assert retrieval.caption_image.tolist() == [k for k in range(359) for _ in range(5)]
    # Every caption names its digit, so caption labels are the image label repeated five times.
    assert (retrieval.caption_labels >= 0).all()
    assert torch.equal(retrieval.caption_labels, retrieval.image_labels.repeat_interleave(5))
    for j in (0, 7, 1000):
        assert NAMES[int(retrieval.caption_labels[j])] in retrieval.captions[j]


def test_coco_karpathy(digits, train_csv):
    train, retrieval = read_captions_corpus("coco", digits.coco_dir, "", SIZE, 0, NAMES)
    check_train(digits, train, train_csv)
    assert train.ids[0] == "000000000000.png#0"
    rows = [0, 5, 300, 1437]
    assert train.labels[rows].tolist() == labels_of(digits, train_csv, rows)
    check_retrieval(digits, retrieval)
    assert retrieval.images.describe(0) == str(digits.coco_dir / "val2017" / f"{digits.n_train:012d}.png")
    few, _ = read_captions_corpus("coco", digits.coco_dir, "", SIZE, 10, NAMES)
    assert len(few) == 10 and few.labels.shape == (10,)


def test_coco_raw_layout_fallback(digits, train_csv, tmp_path):
    root = tmp_path / "coco"
    # Annotations copied (the test deletes some), image folders linked (copying 1,797 files is slow).
    shutil.copytree(digits.coco_dir / "annotations", root / "annotations")
    for folder in ("train2017", "val2017"):
        (root / folder).symlink_to(digits.coco_dir / folder)
    train, retrieval = read_captions_corpus("coco", root, "", SIZE, 0, NAMES)
    assert train.captions == train_csv["title"].tolist()
    assert torch.equal(train.images[3], png(digits, train_csv["filepath"][3]))
    assert train.labels[[2, 9]].tolist() == labels_of(digits, train_csv, [2, 9])
    check_retrieval(digits, retrieval)
    # Without instances files there are no labels; without captions either, a one-line error.
    for f in (root / "annotations").glob("instances_*"):
        f.unlink()
    assert read_captions_corpus("coco", root, "", SIZE, 0, NAMES)[0].labels is None
    (root / "annotations" / "captions_train2017.json").unlink()
    with pytest.raises(UserError, match="dataset_coco.json"):
        read_captions_corpus("coco", root, "", SIZE, 0, NAMES)


def test_flickr30k(digits, train_csv):
    train, retrieval = read_captions_corpus("flickr30k", digits.flickr_dir, "", SIZE, 0, NAMES)
    check_train(digits, train, train_csv)
    assert train.labels is None
    check_retrieval(digits, retrieval)
    assert retrieval.images.describe(0).startswith(str(digits.flickr_dir / "flickr30k-images"))


def test_karpathy_errors(digits, tmp_path):
    with pytest.raises(UserError, match="dataset_flickr30k.json"):
        read_captions_corpus("flickr30k", tmp_path, "", SIZE, 0, NAMES)
    with pytest.raises(UserError, match="nope.json"):
        read_captions_corpus("flickr30k", digits.flickr_dir, str(tmp_path / "nope.json"), SIZE, 0, NAMES)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="bad.json") as info:
        read_captions_corpus("coco", digits.coco_dir, str(bad), SIZE, 0, NAMES)
    assert "\n" not in str(info.value)
    nokey = tmp_path / "nokey.json"
    nokey.write_text(json.dumps({"images": [{"split": "train", "sentences": [{"raw": "x"}]}]}))
    with pytest.raises(UserError, match="filename"):
        read_captions_corpus("flickr30k", digits.flickr_dir, str(nokey), SIZE, 0, NAMES)
    not_karpathy = tmp_path / "list.json"
    not_karpathy.write_text("[]")
    with pytest.raises(UserError, match="'images'"):
        read_captions_corpus("flickr30k", digits.flickr_dir, str(not_karpathy), SIZE, 0, NAMES)
