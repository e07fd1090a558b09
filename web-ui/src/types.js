// Port types as the catalog serialises them ("int", {enum: [...]}, {list: T}),
// and the runtime's connection rules (runtime/src/types.rs, PortType::accepts).

const SCALARS = new Set(['int', 'float', 'bool', 'string', 'path', 'scalar']);

const equal = (a, b) => JSON.stringify(a) === JSON.stringify(b);

export const isEnum = (t) => typeof t === 'object' && t !== null && Array.isArray(t.enum);
export const isList = (t) => typeof t === 'object' && t !== null && 'list' in t;

export function isScalar(t) {
  return isEnum(t) || SCALARS.has(t);
}

/** Whether an output of type `from` may feed an input of type `to`. */
export function accepts(to, from) {
  if (equal(to, from)) return true;
  if (to === 'float' && from === 'int') return true;
  if (to === 'path' && from === 'string') return true;
  if (to === 'string' && isEnum(from)) return true;
  if (isEnum(to) && isEnum(from)) return from.enum.every((c) => to.enum.includes(c));
  if (to === 'tensor' && from === 'latents') return true;
  if (to === 'tensor_like') return ['tensor', 'latents', 'image', 'conditioning'].includes(from);
  if (to === 'scalar') return isScalar(from);
  if (isList(to) && isList(from)) return accepts(to.list, from.list);
  return false;
}

const NAMES = {
  int: 'Int', float: 'Float', bool: 'Bool', string: 'String', path: 'Path', scalar: 'Scalar',
  tensor: 'Tensor', tensor_like: 'TensorLike', latents: 'Latents', image: 'Image',
  conditioning: 'Conditioning', text_encoder: 'TextEncoder', tokenizer: 'Tokenizer',
  denoiser: 'Denoiser', vae: 'Vae', scheduler: 'Scheduler', captioner: 'Captioner', lora: 'Lora', control_net: 'ControlNet',
  dataset: 'Dataset', features: 'Features', checkpoint: 'Checkpoint',
};

/** The type as the CLI prints it: Int, Enum[a|b], List<Float>. */
export function typeName(t) {
  if (isEnum(t)) return `Enum[${t.enum.join('|')}]`;
  if (isList(t)) return `List<${typeName(t.list)}>`;
  return NAMES[t] || String(t);
}

/** Whether a value of this type can be written in the workflow (a widget). */
export function isLiteral(t) {
  return isScalar(t) || (isList(t) && isScalar(t.list));
}

/** A short colour class per family of types, for port dots. */
export function typeClass(t) {
  if (isList(t)) return 'list';
  if (isEnum(t)) return 'string';
  return t;
}
