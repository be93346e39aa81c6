"""Data: image folders, tar shards read in place, samplers, data sources. The multi-crop transform lives in
``ssl_xcit.data.multicrop`` and is not imported here (import it where it is used)."""
from ssl_xcit.data.folders import (IMAGE_EXTENSIONS, Batch, ImageFiles, collate_skip_corrupt, load_listing,
                                   scan_images)
from ssl_xcit.data.sampler import ResumableDistributedSampler, ShardedIndexSampler, sample_seeds
from ssl_xcit.data.shards import ShardError, ShardImages
from ssl_xcit.data.sources import (ArchiveError, default_cache_dir, download_cifar10, extract_archive,
                                   open_image_dataset, resolve_data_path)

__all__ = ["IMAGE_EXTENSIONS", "Batch", "ImageFiles", "collate_skip_corrupt", "load_listing", "scan_images",
           "ResumableDistributedSampler", "ShardedIndexSampler", "sample_seeds",
           "ShardError", "ShardImages", "ArchiveError", "default_cache_dir", "download_cifar10", "extract_archive",
           "open_image_dataset", "resolve_data_path"]
