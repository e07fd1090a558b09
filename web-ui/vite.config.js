import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// Fixed file names (no content hashes): the pixart binary embeds whatever is in
// the output folder, and `PIXART_UI_OUT` lets its build script put it in OUT_DIR.
export default defineConfig({
  plugins: [react()],
  base: './',
  build: {
    outDir: process.env.PIXART_UI_OUT || 'dist',
    emptyOutDir: true,
    assetsDir: 'assets',
    chunkSizeWarningLimit: 2000,
    rollupOptions: {
      output: {
        entryFileNames: 'assets/editor.js',
        chunkFileNames: 'assets/[name].js',
        assetFileNames: 'assets/[name][extname]',
      },
    },
  },
});
