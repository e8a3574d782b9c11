#!/usr/bin/env python3
"""Picks the inputs a fuzz run found that are worth committing (hack/fuzz.sh --corpus).

Reads a libFuzzer merge control file (written by `<target> -merge=1
-merge_control_file=FILE OUT COMMITTED WORKING`), which lists the coverage features of
every input, and copies into COMMITTED the inputs of WORKING that reach the most
features the committed ones do not, greedily, at most MAX of them: a small corpus that
keeps most of what the run reached, replayed by make test in a second or so. Each is
named by the SHA-1 of its content, as libFuzzer names them.

usage: fuzz-corpus.py CONTROL_FILE COMMITTED_DIR MAX
"""

import hashlib
import os
import shutil
import sys


def read_control(path):
    """The files of a merge control file and the features of each."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    count = int(lines[0])
    files = lines[2 : 2 + count]
    features = {}
    for line in lines[2 + count :]:
        parts = line.split()
        if parts and parts[0] == "FT":
            features[int(parts[1])] = set(map(int, parts[2:]))
    return files, features


def main():
    control, committed, most = sys.argv[1], os.path.abspath(sys.argv[2]), int(sys.argv[3])
    files, features = read_control(control)
    inside = lambda f: os.path.abspath(f).startswith(committed + os.sep)
    covered = set()
    candidates = []
    for i, f in enumerate(files):
        if inside(f):
            covered |= features.get(i, set())
        else:
            candidates.append((f, features.get(i, set())))
    picked = []
    while len(picked) < most and candidates:
        # The input adding the most, the smallest among equals.
        best = max(candidates, key=lambda c: (len(c[1] - covered), -os.path.getsize(c[0])))
        if not best[1] - covered:
            break
        candidates.remove(best)
        covered |= best[1]
        picked.append(best[0])
    for f in picked:
        with open(f, "rb") as data:
            name = hashlib.sha1(data.read()).hexdigest()
        shutil.copyfile(f, os.path.join(committed, name))
    print(f"{len(picked)} input(s) added to {committed}")


if __name__ == "__main__":
    main()
