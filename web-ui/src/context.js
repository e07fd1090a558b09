import { createContext, useContext } from 'react';

/** What every node card reads: specs, findings, run state, and how to edit. */
export const EditorContext = createContext(null);
export const useEditor = () => useContext(EditorContext);
