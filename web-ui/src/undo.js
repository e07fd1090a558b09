import { useCallback, useEffect, useRef, useState } from 'react';

/** Most steps kept back. */
const DEPTH = 100;
/** Changes closer together than this are one step (a drag, typing a value). */
const SETTLE_MS = 350;

/**
 * Undo and redo over snapshots of the canvas (`snapshot`: a string that changes
 * whenever the workflow does). `restore(snapshot)` puts one back.
 */
export function useUndo(snapshot, restore) {
  const past = useRef([]);
  const future = useRef([]);
  const last = useRef(null);
  const [, setTick] = useState(0);
  const changed = () => setTick((t) => t + 1);

  const settle = useCallback((now) => {
    if (last.current !== null && last.current !== now) {
      past.current.push(last.current);
      if (past.current.length > DEPTH) past.current.shift();
      future.current = [];
    }
    last.current = now;
    changed();
  }, []);

  useEffect(() => {
    const timer = setTimeout(() => settle(snapshot), SETTLE_MS);
    return () => clearTimeout(timer);
  }, [snapshot, settle]);

  const current = useRef(snapshot);
  current.current = snapshot;

  const undo = useCallback(() => {
    settle(current.current);
    const previous = past.current.pop();
    if (previous === undefined) return;
    future.current.push(last.current);
    last.current = previous;
    restore(previous);
    changed();
  }, [restore, settle]);

  const redo = useCallback(() => {
    if (current.current !== last.current) return; // an edit since the undo: nothing to redo
    const next = future.current.pop();
    if (next === undefined) return;
    past.current.push(last.current);
    last.current = next;
    restore(next);
    changed();
  }, [restore]);

  return { undo, redo, canUndo: past.current.length > 0 || (last.current !== null && last.current !== snapshot), canRedo: future.current.length > 0 };
}
