"""The main job, ``maas demo``: train, export, register, serve and classify the digits dataset."""
