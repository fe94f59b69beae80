"""Where a training run's people come from."""
from fasthg.data.dataset import BAD_IMAGES, SkipBadImages
from fasthg.data.mpii import require_head_sizes, require_images
from fasthg.data.synthetic import SyntheticPoses

# Drawn synthetic people kept per source (the CPU default's 1600 at 128 px take 79 MB; the GPU
# default's 20000 at 256 px would take 3.9 GB and keep the first 512 MiB of them). Only where
# the main process loads them: a DataLoader worker's cache would die with it at the epoch's end.
SYNTHETIC_CACHE_BYTES = 512 * 2**20


def _checked(load, annotation, image_dir):
    """load(annotation, image_dir), every person's image file there (else a clear error)."""
    records = load(annotation, image_dir)
    require_people(records, annotation)
    require_images(records, annotation, image_dir)
    return records


def require_people(records, annotation, which="people"):
    """ValueError naming the annotation file if it gave no people: a run on none would fail
    later, with a message that names no file."""
    if not len(records):
        raise ValueError(f"{annotation}: no {which} in it (expected a file with at least one annotated person)")


def _files(c):
    """(training, validation) records of the MPII or COCO files of a TrainConfig."""
    if c.coco_train or c.coco_valid:
        from fasthg.data.coco import load_coco_keypoints
        if not (c.coco_train and c.coco_valid and c.images):
            raise ValueError("COCO training needs coco_train, coco_valid and images (valid_images too when the "
                             "validation images are in another folder)")
        if c.mpii_h5_train or c.mpii_json_train or c.mpii_h5_valid:
            raise ValueError("give MPII or COCO files, not both: their joints differ (16 and 17)")
        return (_checked(load_coco_keypoints, c.coco_train, c.images),
                _checked(load_coco_keypoints, c.coco_valid, c.valid_images or c.images))
    from fasthg.data.mpii import load_mpii_h5, load_mpii_json
    if not (c.mpii_h5_valid and c.images):
        raise ValueError("MPII training needs mpii_h5_valid (its head sizes give PCKh) and images")
    if c.mpii_h5_train and c.mpii_json_train:
        raise ValueError("give one of mpii_h5_train and mpii_json_train")
    if c.mpii_h5_train:
        train = _checked(load_mpii_h5, c.mpii_h5_train, c.images)
    else:  # a bearpaw list flags its validation people; an HRNet train.json holds none
        train = [r for r in load_mpii_json(c.mpii_json_train, c.images)
                 if not r.extra.get("is_validation", False)]
        require_people(train, c.mpii_json_train, "training people (isValidation 0)")
        require_images(train, c.mpii_json_train, c.images)
    valid = _checked(load_mpii_h5, c.mpii_h5_valid, c.valid_images or c.images)
    require_head_sizes(valid, c.mpii_h5_valid)
    return train, valid


def sources(c):
    """(training, validation) records of a TrainConfig: COCO files (17 joints, validated by OKS AP),
    MPII files, or synthetic people, held out by seed. With c.bad_images "skip", the files'
    people whose image is bad are skipped (SkipBadImages: replaced in training, unscored in
    validation) instead of stopping the run."""
    if c.bad_images not in BAD_IMAGES:
        raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGES)}, got {c.bad_images!r}")
    if c.coco_train or c.coco_valid or c.mpii_h5_train or c.mpii_json_train:
        train, valid = _files(c)
        if len(train) < c.batch_size:  # the Trainer would say so too, without the file
            raise ValueError(f"{c.coco_train or c.mpii_h5_train or c.mpii_json_train}: {len(train)} training people "
                             f"make no batch of {c.batch_size} (expected at least batch_size people)")
        if c.bad_images == "skip":
            return SkipBadImages(train, substitute=True), SkipBadImages(valid, substitute=False)
        return train, valid
    # Training and validation people come from different seeds: validation is held out.
    cache = SYNTHETIC_CACHE_BYTES if c.workers == 0 else 0
    return (SyntheticPoses(c.train_size, c.input_size, seed=c.seed + 1, cache_bytes=cache),
            SyntheticPoses(c.val_size, c.input_size, seed=10_000_019 + c.seed, cache_bytes=SYNTHETIC_CACHE_BYTES))
