"""intake: from a file in the drop folder to a claimed row and a decoded picture.

``walking`` and ``watcher`` find files that are ready (events, scans, readiness), ``reading`` opens
them without following links and hashes them, ``claims`` decides in SQL that each content is
processed once, ``decoding`` (+ ``dicom``) turns bytes into an RGB picture, ``errors`` and
``failures`` name what went wrong and whether to retry. May import: the foundation only.
"""
