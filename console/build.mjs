// Bundles the console's script and style into dist/app.js and dist/app.css, which the
// service embeds with src/index.html, the page as written. The output depends only on
// the sources and on the versions pinned in package-lock.json (no timestamps, no
// content hashes in names), so CI can rebuild it and compare it with the committed one.
import { build } from "esbuild";
import { mkdir } from "node:fs/promises";

await mkdir("dist", { recursive: true });
await build({
  entryPoints: ["src/main.ts"],
  outfile: "dist/app.js",
  bundle: true,
  minify: true,
  format: "iife",
  // BigInt (int64 fields) and async iteration (streams) need ES2020.
  target: "es2020",
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
});
await build({
  entryPoints: ["src/style.css"],
  outfile: "dist/app.css",
  bundle: true,
  minify: true,
  logLevel: "warning",
});
