"""segengine as a node of a hospital network: studies in from a PACS, DICOM SEG back to it.

- ``study_job``: the model loaded once, each received study segmented by ``run``'s PatientJob;
- ``dimse``: C-STORE of the SEG to a configured node, with retries (pynetdicom);
- ``listener``: ``segengine listen``, a storage SCP that gathers instances per study;
- ``dicomweb``: ``segengine pull``, QIDO-RS / WADO-RS in and STOW-RS out (dicomweb-client).
"""
