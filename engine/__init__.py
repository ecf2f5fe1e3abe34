"""segengine's engine. Importing it turns third-party telemetry off (core.runtime.telemetry_off):
every entry point imports this package before ONNX Runtime can initialize."""
from segengine.engine.core.runtime import telemetry_off as _telemetry_off

_telemetry_off()
