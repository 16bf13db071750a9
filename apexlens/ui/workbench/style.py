"""The workbench page's look: its style sheet and the HTML page Dash serves it in (no
external assets: nothing is fetched from the network)."""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f6f7f9;color:#222}
.wb-top{background:#1f2a44;color:#fff;padding:10px 18px;display:flex;align-items:baseline;gap:14px}
.wb-top h1{font-size:18px;margin:0;font-weight:600}.wb-top .ctx{font-size:13px;opacity:.8}
.wb-main{display:flex;gap:14px;padding:12px 14px;align-items:flex-start}
.wb-left{flex:1;min-width:0}.wb-right{width:370px;flex:none;display:flex;flex-direction:column;gap:12px}
.wb-card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 12px}
.wb-card h3{font-size:13px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#556}
.wb-tools{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-bottom:8px}
.wb-tools .grp{display:flex;gap:4px;align-items:center}
button{font:inherit;font-size:13px;padding:4px 10px;border:1px solid #b8c0cc;border-radius:5px;background:#fff;cursor:pointer}
button:hover{background:#eef2f8}button:disabled{opacity:.45;cursor:default}
button.primary{background:#2166ac;color:#fff;border-color:#2166ac}
input[type=text],input[type=number]{font:inherit;font-size:13px;padding:4px 6px;border:1px solid #b8c0cc;border-radius:5px}
.wb-scroll{overflow:auto;max-height:760px;background:#fff;border:1px solid #dde1e7;border-radius:8px}
.wb-canvas{position:relative;margin:4px;z-index:0}
.wb-col{position:absolute;top:6px;width:100px;text-align:center;font-size:12px;color:#778;font-weight:600}
.wb-edge{position:absolute;width:8px;height:8px;box-sizing:border-box;border-radius:50%;border:2px solid;background:#fff;cursor:pointer}
.wb-edge.out{border-width:1.5px}
.wb-line{position:absolute;height:7px;transform-origin:0 50%;z-index:-1}
.wb-stroke{position:absolute;top:50%;left:0;right:0;border-radius:2px;opacity:.8}
.wb-edge.out .wb-stroke{height:0;border-top:1px dashed #c4c8cf;opacity:1}
.wb-edge:hover{border-color:#f08c00 !important;background:#f08c00 !important}
.wb-edge:hover .wb-line{z-index:0}.wb-edge:hover .wb-stroke{background:#f08c00 !important;opacity:1;border-color:#f08c00}
.wb-edge.at{border-radius:1px}
.wb-node{position:absolute;z-index:4;border:1.5px solid #c3c8d0;border-radius:7px;background:#fafbfc;display:flex;
 align-items:center;justify-content:center;cursor:pointer;font-size:12px;color:#889;box-sizing:border-box}
.wb-node.on{border-color:#1f2a44;background:#fff;color:#111;font-weight:600}
.wb-node:hover{box-shadow:0 0 0 3px #f0a30066}
.wb-node.wb-mlp{border-radius:3px;background:#f4f1fa}.wb-node.wb-end{background:#eef3f8}
.wb-port{position:absolute;z-index:5;width:12px;height:12px;border-radius:6px;background:#fff;border:1px solid #aab;
 font-size:8px;line-height:11px;text-align:center;color:#667;cursor:pointer;box-sizing:border-box}
.wb-port.on{border-color:#1f2a44;color:#111}.wb-port:hover{background:#f0a300;color:#fff}
.wb-caption{font-size:12px;color:#556;margin:6px 2px}
.wb-legend{font-size:12px;color:#556;margin:2px}
.wb-legend span.sw{display:inline-block;width:22px;height:4px;vertical-align:middle;margin:0 4px 0 10px}
.wb-big{font-size:30px;font-weight:600;font-variant-numeric:tabular-nums}
.wb-nums{display:grid;grid-template-columns:1fr 1fr;gap:4px 12px}
.wb-nums .lbl{font-size:12px;color:#667}
.wb-detail{font-size:12px;color:#444;margin-top:6px;line-height:1.5;font-variant-numeric:tabular-nums}
.wb-msg{padding:7px 10px;border-radius:6px;font-size:13px;margin-bottom:8px}
.wb-msg.error{background:#fdecea;border:1px solid #e0a39d;color:#8a1c12;position:fixed;top:14px;left:50%;
 transform:translateX(-50%);z-index:100;max-width:760px;box-shadow:0 4px 18px #0003;cursor:pointer}
.wb-msg.error::after{content:"  ×";font-weight:700}
.wb-msg.note{background:#eef6ee;border:1px solid #b6d7b6;color:#24572a}
.wb-msg.empty{display:none}
table.wb-table{border-collapse:collapse;font-size:12.5px;width:100%}
.wb-table td,.wb-table th{border-bottom:1px solid #e4e7ec;padding:3px 6px;text-align:right;font-variant-numeric:tabular-nums}
.wb-table td.l,.wb-table th.l{text-align:left}.wb-table tr.cur{background:#fff7e0}
.wb-table tr.pa td:first-child{box-shadow:inset 4px 0 #2166ac}.wb-table tr.pb td:first-child{box-shadow:inset 4px 0 #b2182b}
.wb-table button{padding:1px 7px;font-size:12px}
.wb-cmp{display:grid;grid-template-columns:1fr 1fr;gap:10px;margin-top:8px}
.wb-cmp ul{margin:4px 0;padding-left:18px;font-size:12.5px;max-height:220px;overflow:auto;font-family:ui-monospace,monospace}
.wb-lower{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:14px;padding:0 14px 14px}
.wb-upload{border:1.5px dashed #aab;border-radius:6px;padding:8px;text-align:center;font-size:13px;cursor:pointer;background:#fafbfc}
.wb-row{display:flex;gap:6px;align-items:center;flex-wrap:wrap;margin:5px 0;font-size:13px}
.wb-radio label{margin-right:8px;font-size:13px}
.wb-hint{font-size:12px;color:#667}
"""

INDEX = (
    """<!DOCTYPE html>
<html><head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>"""
    + CSS
    + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body></html>"""
)
