// Assembles build/index.html from the page template and its parts. The
// output depends only on the sources, so rebuilding changes nothing.
const fs = require("fs");
const path = require("path");

const src = path.join(__dirname, "src");
const out = path.join(__dirname, "build");
const template = fs.readFileSync(path.join(src, "index.html"), "utf8");
const items = JSON.parse(fs.readFileSync(path.join(src, "stages.json"), "utf8"));
const list = items.map((s) => `    <li><b>${s.name}</b>: ${s.what}</li>`).join("\n");
fs.mkdirSync(out, { recursive: true });
fs.writeFileSync(
  path.join(out, "index.html"),
  template.replace("{{stages}}", list).replace("{{node}}", process.version.split(".")[0])
);
fs.copyFileSync(path.join(src, "style.css"), path.join(out, "style.css"));
console.log(`built ${items.length} items into ${path.relative(__dirname, out)}/`);
