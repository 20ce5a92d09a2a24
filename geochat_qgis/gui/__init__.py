"""Qt/QGIS user interface: the chat dock, map tools, the task worker and result layers."""
