"""Tests of blockswap_plugin.mmdet against real mmdet, mmengine and COCO128."""
