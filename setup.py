"""Packaging (issue 21): the repository's top-level folders `runtime/`, `exporter/` and `graph_passes/` install as
`anchorrt.runtime`, `anchorrt.exporter` and `anchorrt.graph_passes`, so the distribution puts exactly one name,
`anchorrt`, into site-packages. Everything else lives in pyproject.toml; this file only computes the mapping, so a
new subpackage needs no edit here."""

from setuptools import find_packages, setup

MAPPED = ("runtime", "exporter", "graph_passes")

packages = ["anchorrt"] + [f"anchorrt.{top}" for top in MAPPED]
packages += [f"anchorrt.{top}.{sub}" for top in MAPPED for sub in find_packages(top)]
package_dir = {"anchorrt": "anchorrt", **{f"anchorrt.{top}": top for top in MAPPED}}

# Data files that ship: CHAIR's official synonym table and the WordNet lemmas it needs.
setup(packages=packages, package_dir=package_dir,
      package_data={"anchorrt.runtime.eval": ["chair_lemmas.json", "coco_synonyms.txt"]})
