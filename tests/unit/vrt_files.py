"""GDAL VRT files for tests: a raster of any size or data type over a small real one, planned
and opened by GDAL as the real thing (nothing is read until pixels are asked for)."""
from __future__ import annotations

from pathlib import Path

TEMPLATE = """<VRTDataset rasterXSize="{width}" rasterYSize="{height}"><SRS>EPSG:32633</SRS>
<GeoTransform>500000, 1, 0, 5000000, 0, -1</GeoTransform>
<VRTRasterBand dataType="{data_type}" band="1"><SimpleSource>
<SourceFilename relativeToVRT="0">{source}</SourceFilename><SourceBand>1</SourceBand>
</SimpleSource></VRTRasterBand></VRTDataset>"""


def write_vrt(path: Path, source: Path, width: int, height: int, data_type: str) -> Path:
    """A one-band VRT of ``width`` x ``height`` px of GDAL type ``data_type`` (e.g. UInt16,
    CInt32) over band 1 of ``source``, 1 m pixels in UTM 33N."""
    path.write_text(TEMPLATE.format(width=width, height=height, data_type=data_type,
                                    source=Path(source).resolve()))
    return path
